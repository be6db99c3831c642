"""Ollama's /api/chat and /api/generate over the official `ollama` library, against the real daemon.

One daemon for the module (test_agents' `agent` and `thinker`); the few-shot history of
test_agents makes the tiny model write a tool call itself. Few tokens everywhere.
"""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from conftest import wait_until
from test_agents import TOOLS, agent_daemon, agent_messages

Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with agent_daemon(tmp_path_factory.mktemp("ollama")) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    return ollama.Client(host=daemon.url, timeout=600)


def ollama_shaped(messages: list[dict]) -> list[dict]:
    """OpenAI-shaped turns as Ollama's clients send them: arguments as objects, no call ids."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "tool_call_id"}
        if m.get("tool_calls"):
            m["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                             "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def test_chat_collected_and_streamed_agree(client, daemon):
    r = client.chat(model="agent", messages=Q, options={"num_predict": 6})
    assert r.done and r.done_reason == "length" and r.message.role == "assistant" and r.message.content
    assert r.eval_count == 6 and r.prompt_eval_count > 5
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0
    assert r.total_duration >= r.load_duration >= 0
    parts = list(client.chat(model="agent", messages=Q, options={"num_predict": 6}, stream=True))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == r.message.content
    assert (parts[-1].eval_count, parts[-1].prompt_eval_count, parts[-1].done_reason) == \
        (6, r.prompt_eval_count, "length")
    # streamed by default, as NDJSON: one JSON object a line
    with httpx.stream("POST", f"{daemon.url}/api/chat", json={"model": "agent:latest", "messages": Q,
                                                              "options": {"num_predict": 2}}) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True] and len(lines) >= 3


def test_generate_templated_raw_and_stop(client):
    prompt = "The capital of France is"
    r = client.generate(model="agent", prompt=prompt, options={"num_predict": 8})
    assert r.done and r.response and r.eval_count == 8
    s = list(client.generate(model="agent", prompt=prompt, options={"num_predict": 8}, stream=True))
    assert "".join(p.response for p in s) == r.response and s[-1].done
    raw = client.generate(model="agent", prompt=prompt, raw=True, options={"num_predict": 4})
    assert raw.response and raw.prompt_eval_count < r.prompt_eval_count      # no chat template around it
    stop = r.response.strip()[1:3]
    cut = client.generate(model="agent", prompt=prompt, options={"num_predict": 8, "stop": [stop]})
    assert cut.done_reason == "stop" and cut.response == r.response[:r.response.index(stop)]


def test_format_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    r = client.chat(model="agent", messages=[{"role": "user", "content": "Name a city in France."}], format=schema,
                    options={"num_predict": 40})
    data = json.loads(r.message.content)
    assert set(data) == {"city", "capital"} and isinstance(data["city"], str) and isinstance(data["capital"], bool)


def test_tool_call_round_trip(client, daemon):
    messages = ollama_shaped(agent_messages("loop.py"))
    r = client.chat(model="agent", messages=messages, tools=TOOLS, options={"num_predict": 40})
    [call] = r.message.tool_calls
    assert call.function.name == "read" and call.function.arguments == {"path": "loop.py"}
    assert r.done_reason == "stop" and "tool_call" not in r.message.content
    parts = list(client.chat(model="agent", messages=messages, tools=TOOLS, options={"num_predict": 40}, stream=True))
    assert [(c.function.name, c.function.arguments) for p in parts for c in p.message.tool_calls or []] == \
        [("read", {"path": "loop.py"})]
    # the call goes back with its result; the prompt is rendered as Chat Completions renders it
    # (the tools as this library sends them: its Tool model keeps fewer schema keys)
    sent_tools = [ollama.Tool.model_validate(t).model_dump(exclude_none=True) for t in TOOLS]
    messages += [r.message, {"role": "tool", "content": "print('loop')", "tool_name": "read"}]
    second = client.chat(model="agent", messages=messages, tools=TOOLS, options={"num_predict": 2})
    oa_messages = agent_messages("loop.py") + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_x", "type": "function", "function": {
            "name": "read", "arguments": json.dumps({"path": "loop.py"})}}]},
        {"role": "tool", "tool_call_id": "call_x", "content": "print('loop')"}]
    oa = daemon.openai().chat.completions.create(model="agent", messages=oa_messages, tools=sent_tools,
                                                     max_tokens=2)
    assert second.prompt_eval_count == oa.usage.prompt_tokens > r.prompt_eval_count + r.eval_count


def test_think_goes_to_message_thinking(client):
    r = client.chat(model="thinker", messages=Q, think=True, options={"num_predict": 10})
    assert r.message.thinking and "<think>" not in r.message.thinking + r.message.content
    parts = list(client.chat(model="thinker", messages=Q, think=True, options={"num_predict": 10}, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == r.message.thinking
    off = client.chat(model="thinker", messages=Q, think=False, options={"num_predict": 4})
    assert off.message.thinking is None and off.message.content
    g = client.generate(model="thinker", prompt=Q[0]["content"], think=True, options={"num_predict": 6})
    assert g.thinking and not g.response.startswith("<think>")


def test_think_on_a_model_that_cannot_think_is_a_400(client):
    """As Ollama answers it: `think` is not dropped where the template has no thinking markers."""
    calls = (lambda s: client.chat(model="agent", messages=Q, think=True, stream=s),
             lambda s: client.chat(model="agent", messages=Q, think="high", stream=s),
             lambda s: client.generate(model="agent", prompt="hi", think=True, stream=s))
    for call in calls:
        for stream in (False, True):
            with pytest.raises(ollama.ResponseError) as e:
                r = call(stream)
                list(r) if stream else None
            assert e.value.status_code == 400 and "does not support thinking" in e.value.error, e.value.error
    r = client.chat(model="agent", messages=Q, think=False, options={"num_predict": 2})
    assert r.eval_count == 2 and r.message.thinking is None
    assert "thinking" in client.show("thinker").capabilities and "thinking" not in client.show("agent").capabilities


@pytest.mark.parametrize("opts, named", [
    ({"min_p": 0.1, "mirostat": 1}, ["min_p", "mirostat"]),
    ({"temperature": "hot"}, ["options.temperature"]),
    ({"num_predict": 0}, ["options.num_predict"]),
    ({"num_ctx": 4096}, ["options.num_ctx", "512"]),          # thinker's context is 512 tokens
])
def test_bad_options_are_a_400_naming_them(client, opts, named):
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as e:
            r = client.chat(model="thinker", messages=Q, options=opts, stream=stream)
            list(r) if stream else None
        assert e.value.status_code == 400 and all(n in e.value.error for n in named), e.value.error


def test_accepted_options_and_unsupported_fields(client, daemon):
    r = client.chat(model="thinker", messages=Q, think=False, options={
        "num_ctx": 256, "num_thread": 4, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3, "num_predict": 2})
    assert r.eval_count == 2
    resp = httpx.post(f"{daemon.url}/api/generate", json={"model": "agent", "prompt": "hi", "images": ["aGk="]})
    assert resp.status_code == 400 and "images" in resp.json()["error"]


def test_unknown_model_is_a_404(client):
    for call in (lambda: client.chat(model="nope", messages=Q), lambda: client.generate(model="nope:latest", prompt="x")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and "nope" in e.value.error


def test_keep_alive_zero_unloads_and_an_empty_prompt_loads(client, daemon):
    r = client.generate(model="thinker", prompt="hi", keep_alive=0, options={"num_predict": 1})
    assert r.done
    wait_until(lambda: daemon.model_status("thinker")["state"] != "ready", 30, "thinker unloaded")
    loaded = client.generate(model="thinker", prompt="")
    assert loaded.done_reason == "load" and daemon.model_status("thinker")["state"] == "ready"
    assert client.chat(model="thinker", messages=[], keep_alive=0).done_reason == "unload"
