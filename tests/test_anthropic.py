"""Anthropic's Messages API over the official `anthropic` SDK, against the real daemon and model.

The same few-shot agent history as test_agents.py (in Anthropic's blocks) makes the tiny model
write a tool call itself; a think template gives thinking blocks.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from test_agents import SYSTEM, TOOLS, agent_daemon

KEY = "sk-test-anthropic"
PING = 0.25                  # server.stream_ping_seconds
A_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"]} for t in TOOLS]
A_TOOLS[0]["defer_loading"] = True           # Claude Code's unknown tool fields are ignored


def shots() -> list[dict]:
    """Five earlier calls of the read tool, as Claude Code sends them back."""
    out = []
    for i, c in enumerate("abcde"):
        out += [{"role": "user", "content": f"Read {c}.py"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": f"call_{i}", "name": "read",
                                                   "input": {"path": f"{c}.py"}}]}]
    return out


def agent_messages(path="main.py") -> list[dict]:
    return [*shots(), {"role": "user", "content": f"Read {path}"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # One sequence at a time: a request waits while another decodes, which the ping test uses.
    d = agent_daemon(tmp_path_factory.mktemp("anthropic"), agent_engine={"max_batch_size": 1},
                     server={"auth": {"api_keys": [KEY]}, "max_body_bytes": "1MiB", "stream_ping_seconds": PING},
                     api_key=KEY)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon):
    return anthropic.Anthropic(base_url=daemon.url, api_key=KEY, max_retries=0, timeout=600)


def test_text_message_and_usage(client):
    r = client.messages.create(model="agent", max_tokens=6, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    assert r.type == "message" and r.role == "assistant" and r.model == "agent"
    [block] = r.content
    assert block.type == "text" and block.text
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 6
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens > 5


def test_stream_helper_matches_the_collected_message(client):
    kw = dict(model="agent", max_tokens=8, system=[{"type": "text", "text": "Be brief.", "cache_control": {
        "type": "ephemeral"}}], messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
              metadata={"user_id": "u1"}, extra_body={"temperature": 0.0, "top_k": 5, "top_p": 0.9})
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == full.content[0].text == final.content[0].text
    assert final.stop_reason == full.stop_reason and final.usage.output_tokens == full.usage.output_tokens


def test_stop_sequences(client):
    base = client.messages.create(model="agent", max_tokens=10, messages=[{"role": "user", "content": "Count to five."}])
    word = base.content[0].text.split()[1]
    r = client.messages.create(model="agent", max_tokens=10, stop_sequences=[word],
                               messages=[{"role": "user", "content": "Count to five."}])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == word
    assert word not in r.content[0].text


def test_tool_use_round_trip_with_tool_choice_any(client):
    kw = dict(model="agent", max_tokens=40, system=SYSTEM, tools=A_TOOLS)
    first = client.messages.create(messages=agent_messages(), tool_choice={"type": "any"}, **kw)
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "read" and call.input == {"path": "main.py"} and call.id
    messages = agent_messages() + [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": [
            {"type": "text", "text": "print('hi')"}]}, {"type": "text", "text": "What does it print?"}]}]
    second = client.messages.create(messages=messages, **kw)
    assert second.content and second.stop_reason in ("end_turn", "tool_use", "max_tokens")
    # the whole first exchange, the model's own call included, came from the prefix cache
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.cache_read_input_tokens


def test_streamed_tool_use_sends_input_json_deltas(client):
    kw = dict(model="agent", max_tokens=40, system=SYSTEM, tools=A_TOOLS, messages=agent_messages("x.py"))
    full = client.messages.create(**kw)
    events = list(client.messages.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"
              and e.delta.type == "input_json_delta"]
    assert len(deltas) > 1 and json.loads("".join(deltas)) == {"path": "x.py"}
    with client.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == \
        [(b.name, b.input) for b in full.content if b.type == "tool_use"] == [("read", {"path": "x.py"})]
    assert final.stop_reason == "tool_use"


def test_tool_choice_none_gives_text_only(client):
    r = client.messages.create(model="agent", max_tokens=30, system=SYSTEM, tools=A_TOOLS,
                               messages=agent_messages(), tool_choice={"type": "none"})
    assert all(b.type == "text" for b in r.content) and r.stop_reason != "tool_use"


def test_named_tool_choice_is_enforced(client):
    """Enforced by grammar: the model would not call `list` on its own here."""
    r = client.messages.create(model="agent", max_tokens=40, tools=A_TOOLS, tool_choice={"type": "tool", "name": "list"},
                               messages=[{"role": "user", "content": "Show me the files in src."}])
    assert [b.name for b in r.content if b.type == "tool_use"] == ["list"] and r.stop_reason == "tool_use"


def test_thinking_blocks_from_a_reasoning_template(client):
    kw = dict(model="thinker", max_tokens=12, messages=[{"role": "user", "content": "What is the capital of France?"}])
    r = client.messages.create(thinking={"type": "adaptive"}, **kw)
    assert r.content[0].type == "thinking" and r.content[0].thinking
    assert "<think>" not in r.content[0].thinking
    with client.messages.stream(thinking={"type": "enabled", "budget_tokens": 1024}, **kw) as s:
        final = s.get_final_message()
        assert final.content[0].thinking == r.content[0].thinking
    off = client.messages.create(thinking={"type": "disabled"}, **kw)
    assert [b.type for b in off.content] == ["text"]
    # thinking blocks sent back are accepted; a role: system message after the first user turn too
    again = client.messages.create(model="thinker", max_tokens=4, thinking={"type": "disabled"}, messages=[
        kw["messages"][0], {"role": "assistant", "content": [b.model_dump() for b in r.content]},
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "And of Spain?"}])
    assert again.stop_reason in ("end_turn", "max_tokens") and again.usage.input_tokens > 0


def test_count_tokens_matches_the_prompt(client):
    kw = dict(model="agent", system=SYSTEM, tools=A_TOOLS, messages=agent_messages())
    n = client.messages.count_tokens(**kw).input_tokens
    r = client.messages.create(max_tokens=1, **kw)
    assert n == r.usage.input_tokens + r.usage.cache_read_input_tokens


def test_errors_are_anthropic_exceptions(client, daemon):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="agent", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "image" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="agent", max_tokens=1, extra_body={"temperature": 1.5},
                               messages=[{"role": "user", "content": "x"}])
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:       # context too long: refused before the stream starts
        client.messages.create(model="thinker", max_tokens=1, stream=True,
                               messages=[{"role": "user", "content": "word " * 600}])
    assert "context length" in e.value.body["error"]["message"]
    bad = anthropic.Anthropic(base_url=daemon.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="agent", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    for method, path, kw, status, kind in [
            ("GET", "/v1/messages", {}, 405, "invalid_request_error"),
            ("POST", "/v1/messages/nothing", {"json": {}}, 404, "not_found_error"),
            ("POST", "/v1/messages", {"content": b"x" * (2 << 20)}, 413, "request_too_large")]:
        r = httpx.request(method, f"{daemon.url}{path}", headers={"x-api-key": KEY}, timeout=60, **kw)
        assert r.status_code == status and r.json() == {"type": "error", "error": {
            "type": kind, "message": r.json()["error"]["message"]}}, (path, r.text)


def test_models_list_reads_in_both_sdks(client, daemon):
    ids = [m.id for m in client.models.list()]
    assert "agent" in ids and "thinker" in ids
    assert client.models.retrieve("agent").id == "agent"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nope")
    import openai

    oa = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in oa.models.list()} == set(ids) and oa.models.retrieve("thinker").owned_by == "mlxd"


def test_ping_events_while_a_stream_waits(daemon):
    """Real clients send ?beta=true and anthropic-version; a stream silent for stream_ping_seconds
    (here: waiting for the only batch slot, which another request holds until this test lets go of
    it, however fast the machine) sends `event: ping`, and its answer follows once it runs."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    hog = {"model": "agent", "max_tokens": 4000, "stream": True, "temperature": 0.0,
           "prompt": ", ".join(str(i) for i in range(1, 21)) + ","}     # counting on, until cancelled
    body = {"model": "agent", "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    seen, held = [], True
    with httpx.stream("POST", f"{daemon.url}/v1/completions", json=hog, timeout=600, headers=headers) as h:
        hog_lines = h.iter_lines()      # kept: a dropped iterator closes the response
        next(line for line in hog_lines if '"text":' in line)     # it decodes
        # Pings come every 0.25 s: two minutes without a byte is a hang, not a slow machine.
        with httpx.stream("POST", f"{daemon.url}/v1/messages?beta=true", json=body, headers=headers,
                          timeout=httpx.Timeout(600, read=120)) as r:
            assert r.status_code == 200
            try:
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        seen.append(line[7:])
                    if seen.count("ping") == 3 and held:
                        h.close()       # the slot is free: the waiting request runs
                        held = False
            except httpx.ReadTimeout:
                pytest.fail(f"nothing for 120 s on a stream waiting for the batch slot: {seen}")
    first_block = seen.index("content_block_start")
    assert seen[0] == "message_start" and seen[:first_block].count("ping") >= 3, seen
    assert "content_block_delta" in seen and seen[-1] == "message_stop", seen


def test_session_noise_is_dropped_so_a_new_session_hits_the_cache(client):
    """Claude Code's first system block changes every session; the rest is shared."""
    def session(n):
        return client.messages.create(model="agent", max_tokens=1, tools=A_TOOLS, system=[
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1; cch={n:08x};"},
            {"type": "text", "text": SYSTEM}], messages=[{"role": "user", "content": f"Session {n}: hello"}])

    session(1)
    r = session(2)
    assert r.usage.cache_read_input_tokens >= r.usage.input_tokens + r.usage.cache_read_input_tokens - 16


def test_multi_turn_conversation_reads_the_cache_across_a_restart(client, daemon):
    messages = [{"role": "user", "content": "Tell me about Paris in one sentence."}]
    prev = client.messages.create(model="agent", max_tokens=12, messages=messages)
    for turn in ("And Rome?", "And Madrid?"):
        messages += [{"role": "assistant", "content": [b.model_dump() for b in prev.content]}, {"role": "user", "content": turn}]
        r = client.messages.create(model="agent", max_tokens=12, messages=messages)
        prompt = prev.usage.input_tokens + prev.usage.cache_read_input_tokens
        assert r.usage.cache_read_input_tokens >= prompt, (r.usage, prev.usage)
        prev = r
    daemon.stop()
    daemon.start()
    messages += [{"role": "assistant", "content": [b.model_dump() for b in prev.content]}, {"role": "user", "content": "And Lisbon?"}]
    r = client.messages.create(model="agent", max_tokens=4, messages=messages)
    assert r.usage.cache_read_input_tokens >= prev.usage.input_tokens + prev.usage.cache_read_input_tokens
