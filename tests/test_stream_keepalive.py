"""A stream that waits before its first token (an on-demand load, a grammar compile, a request
held for speculation) gets its headers and a keep-alive, so proxies do not drop it.

The model here loads on demand (`preload: false`), and a worker's start takes seconds;
`stream_ping_seconds` is short, so the keep-alive must arrive while the model still loads.
A refusal that comes after the headers is an error inside the stream, in each API's shape.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest

from conftest import Daemon, OnDemandDaemon

PING = 0.2




@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with OnDemandDaemon(tmp_path_factory.mktemp("keepalive"), [
        {"name": "lazy", "source": "embedded:smollm2", "preload": False, "engine": {"context_length": 96},
         "sampling": {"temperature": 0.0, "max_tokens": 8}},
    ], server={"stream_ping_seconds": PING}) as d:
        yield d


def unloaded(d: Daemon) -> None:
    """The model parked, so the next request loads it again."""
    if d.model_status("lazy")["state"] != "stopped":
        assert httpx.post(f"{d.url}/v1/models/lazy/unload", timeout=120).status_code == 200
    deadline = time.monotonic() + 120
    while d.model_status("lazy")["state"] != "stopped":
        assert time.monotonic() < deadline, d.model_status("lazy")
        time.sleep(0.1)


def first_lines(d: Daemon, path: str, body: dict):
    """(status, the stream's lines up to the first blank one, the model's state then, every line)."""
    with httpx.stream("POST", f"{d.url}{path}", json=body, timeout=300) as r:
        head, state, lines = [], None, []
        for line in r.iter_lines():
            lines.append(line)
            if state is None:
                if line:
                    head.append(line)
                elif head:
                    state = d.model_status("lazy")["state"]
        return r.status_code, r.headers.get("content-type", ""), head, state, lines


def test_openai_stream_on_a_loading_model_gets_headers_and_a_keep_alive_first(daemon):
    unloaded(daemon)
    status, ctype, head, state, lines = first_lines(daemon, "/v1/chat/completions", {
        "model": "lazy", "stream": True, "messages": [{"role": "user", "content": "Say hi."}]})
    assert status == 200 and ctype.startswith("text/event-stream")
    assert head == [": keep-alive"] and state == "loading"
    assert [ln for ln in lines if ln][-1] == "data: [DONE]" and any(ln.startswith("data: {") and '"content"' in ln for ln in lines)
    # The official client reads such a stream like any other.
    unloaded(daemon)
    c = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=300)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="lazy", stream=True, messages=[{"role": "user", "content": "Say hi."}]) if ch.choices)
    assert text


def test_anthropic_stream_on_a_loading_model_starts_and_pings(daemon):
    unloaded(daemon)
    status, _, head, state, lines = first_lines(daemon, "/v1/messages", {
        "model": "lazy", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]})
    assert status == 200 and state == "loading"
    assert head[0] == "event: message_start"
    events = [ln.removeprefix("event: ") for ln in lines if ln.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"] and events[-1] == "message_stop"
    delta = next(json.loads(ln[6:]) for ln in lines if ln.startswith("data: ") and '"message_delta"' in ln)
    assert delta["usage"]["input_tokens"] > 0         # the prompt's size, known once the worker took it
    unloaded(daemon)
    ac = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=300)
    with ac.messages.stream(model="lazy", max_tokens=8, messages=[{"role": "user", "content": "Say hi."}]) as s:
        msg = s.get_final_message()
    assert msg.content and msg.usage.input_tokens > 0 and msg.stop_reason in ("end_turn", "max_tokens")


def test_responses_stream_on_a_loading_model_keeps_alive(daemon):
    unloaded(daemon)
    status, _, head, state, lines = first_lines(daemon, "/v1/responses", {
        "model": "lazy", "stream": True, "input": "Say hi.", "max_output_tokens": 8})
    assert status == 200 and state == "loading"
    assert ": keep-alive" in lines
    assert {"event: response.completed", "event: response.incomplete"} & set(lines)     # 8 tokens may cut it short


def test_a_refusal_after_the_headers_is_an_error_in_the_stream(daemon):
    long = "word " * 200                               # past the model's 96-token context
    unloaded(daemon)
    c = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=300)
    with pytest.raises(openai.APIError) as e:
        for _ in c.chat.completions.create(model="lazy", stream=True, messages=[{"role": "user", "content": long}]):
            pass
    assert "context length" in str(e.value)
    unloaded(daemon)
    _, _, _, _, lines = first_lines(daemon, "/v1/messages", {
        "model": "lazy", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": long}]})
    err = next(json.loads(ln[6:]) for ln in lines if ln.startswith("data: ") and '"error"' in ln)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
