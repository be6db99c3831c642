"""Coding agents end to end: tools, tool calls, reasoning and long max_tokens, over the openai SDK.

SmolLM2's template knows no tools, so these run through the fallback format. The tiny model
does not decide to call tools on its own; a few earlier turns in the history, each a real
`tool_calls` message, make it write the next call itself (greedy), which is what an agent
loop needs to exercise rendering, parsing, streaming and the prefix cache.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import Daemon, smol

# SmolLM2's format, opening <think> unless enable_thinking is false, rejecting late system messages
THINK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}{{ raise_exception('System message must be first') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if reasoning_effort is defined %}{{ 'Effort: ' + reasoning_effort + '\n' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% if enable_thinking %}{{ '<think>\n' }}{% endif %}"
    "{% endif %}")


def _tool(name, desc, **props):
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()}, "required": list(props)[:1],
        "additionalProperties": False}}}      # as agents' zod schemas say


# opencode's ten tools, shortened descriptions
TOOLS = [
    _tool("bash", "Run a shell command.", command="string", timeout="number"),
    _tool("read", "Read a file.", path="string", offset="number", limit="number"),
    _tool("write", "Write a file.", path="string", content="string"),
    _tool("edit", "Replace text in a file.", path="string", oldString="string", newString="string"),
    _tool("glob", "Find files by pattern.", pattern="string"),
    _tool("grep", "Search file contents.", pattern="string", path="string"),
    _tool("list", "List a directory.", path="string"),
    _tool("webfetch", "Fetch a URL.", url="string"),
    _tool("todowrite", "Update the todo list.", todos="array"),
    _tool("task", "Start a sub-agent.", prompt="string"),
]
SYSTEM = "You are a coding agent. To read a file, call the read tool with its path."


def _call_turns(path: str, result: str, n: int) -> list[dict]:
    """An earlier step of the loop as opencode sends it back: empty content, the call, its result."""
    cid = f"call_{n}"
    return [{"role": "user", "content": f"Read {path}"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": "read", "arguments": json.dumps({"path": path})}}]},
            {"role": "tool", "tool_call_id": cid, "content": result}]


# Five earlier calls (without their results, which send this small model off copying them)
# make it write the next call itself.
SHOTS = [m for i, c in enumerate("abcde") for m in _call_turns(f"{c}.py", "", i) if m["role"] != "tool"]


def agent_messages(path="main.py") -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, *SHOTS, {"role": "user", "content": f"Read {path}"}]


def agent_daemon(tmp, agent_engine: dict | None = None, **daemon_kw) -> Daemon:
    """The agent API tests' daemon: `agent` (plain SmolLM2) and `thinker` (a reasoning template)."""
    (tmp / "think.jinja").write_text(THINK_TEMPLATE)
    return Daemon(tmp, [
        smol("agent", engine=agent_engine or {}, sampling={"temperature": 0.0, "max_tokens": 64}),
        smol("thinker", chat_template=str(tmp / "think.jinja"), reasoning_parser="think",
             engine={"context_length": 512}, sampling={"temperature": 0.0, "max_tokens": 48}),
    ], **daemon_kw)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with agent_daemon(tmp_path_factory.mktemp("agents")) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    return daemon.openai(timeout=600)


def stream(client, **kw):
    """Reassemble a streamed chat completion as the SDK's users do: content, reasoning, calls by index."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    content, reasoning, calls, finish, arg_chunks = "", "", {}, None, 0
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert call["id"] is None, "id only in a call's first chunk"
                assert tc.function.name and not call["arguments"], "id and name before the arguments"
                call["id"], call["name"] = tc.id, tc.function.name
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
                arg_chunks += 1
        finish = c.choices[0].finish_reason or finish
    assert chunks[-1].usage is not None
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)],
            "finish": finish, "usage": chunks[-1].usage, "arg_chunks": arg_chunks}


def test_opencode_shaped_request_streams_a_tool_call(client):
    """10 tools, streamed, include_usage, tool_choice auto, max_tokens 32000 on an 8K context."""
    r = stream(client, model="agent", messages=agent_messages(), tools=TOOLS, tool_choice="auto", max_tokens=32000)
    assert r["finish"] == "tool_calls"
    [call] = r["calls"]
    assert call["name"] == "read" and json.loads(call["arguments"]) == {"path": "main.py"}
    assert call["id"].startswith("call_")
    assert r["arg_chunks"] > 1                     # the arguments came as deltas, not whole at the end
    assert "<" not in r["content"] and "tool_call" not in r["content"]


def test_agent_loop_reuses_the_cache_every_step(client):
    """Call, tool result, answer: each step's prompt is the last one's plus the call and its result."""
    messages = agent_messages("loop.py")
    kw = dict(model="agent", tools=TOOLS, max_tokens=40)
    first = client.chat.completions.create(messages=messages, **kw)
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert msg.content is None and msg.refusal is None
    [call] = msg.tool_calls
    assert call.type == "function" and call.function.name == "read"
    assert json.loads(call.function.arguments) == {"path": "loop.py"}

    messages += [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "print('loop')"}]
    second = client.chat.completions.create(messages=messages, **kw)
    # Everything up to the re-rendered assistant turn is reused, and that turn itself: the
    # fallback re-renders the call as the model wrote it.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens - 1

    messages += [{"role": "assistant", "content": second.choices[0].message.content or "",
                  **({"tool_calls": [c.model_dump() for c in second.choices[0].message.tool_calls]}
                     if second.choices[0].message.tool_calls else {})},
                 {"role": "user", "content": "Thanks. What did it print?"}]
    for m in messages[-2:-1]:
        for c in m.get("tool_calls", []):
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": "done"})
    third = client.chat.completions.create(messages=messages, **kw)
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, second, third)]
    assert cached[0] < cached[1] < cached[2], cached
    assert cached[2] >= second.usage.prompt_tokens


def test_new_session_hits_the_shared_system_prompt_and_tools(client):
    def session(first_words):
        return client.chat.completions.create(model="agent", tools=TOOLS, max_tokens=2, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": first_words}])

    session("Good morning")
    r = session("Hello there")
    # the system prompt and the ten tools (all but the new user turn) come from the cache
    assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16


def test_streamed_and_collected_calls_agree(client):
    kw = dict(model="agent", messages=agent_messages("x.py"), tools=TOOLS, max_tokens=40)
    full = client.chat.completions.create(**kw)
    s = stream(client, **kw)
    assert [(c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls] == \
        [(c["name"], c["arguments"]) for c in s["calls"]]
    assert s["finish"] == full.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_gives_no_call_and_no_markup(client):
    r = client.chat.completions.create(model="agent", messages=agent_messages(), tools=TOOLS, tool_choice="none",
                                       max_tokens=40)
    assert r.choices[0].message.tool_calls is None
    assert "<tool_call" not in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason == "stop"


def test_think_template_goes_to_reasoning_content(client):
    kw = dict(model="thinker", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    assert m.model_extra["reasoning_content"] and m.model_extra["reasoning"] == m.model_extra["reasoning_content"]
    assert "<think>" not in (m.content or "") and "</think>" not in (m.content or "")
    s = stream(client, **kw)
    assert s["reasoning"] == m.model_extra["reasoning_content"] and s["content"] == (m.content or "")


def test_template_kwargs_and_reasoning_effort_reach_the_template(client):
    kw = dict(model="thinker", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=6)
    r = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content and "reasoning_content" not in (r.choices[0].message.model_extra or {})
    effort = client.chat.completions.create(**kw, reasoning_effort="high")
    plain = client.chat.completions.create(**kw)
    assert effort.usage.prompt_tokens > plain.usage.prompt_tokens      # "Effort: high" was rendered


def test_reasoning_effort_on_a_model_that_cannot_use_it_is_a_400_in_each_api(client, daemon):
    """SmolLM2's own template reads no effort and has no thinking markers: an effort would be
    dropped, so each API refuses it naming its own field; "none" (do not reason) is what the
    model does anyway and is served."""
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="agent", messages=msgs, max_tokens=2, reasoning_effort="high")
    assert e.value.body["param"] == "reasoning_effort" and e.value.body["code"] == "unsupported_parameter"
    assert "does not reason" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="agent", input="Hi", max_output_tokens=2, reasoning={"effort": "low"})
    assert e.value.body["param"] == "reasoning.effort"
    streamed = httpx.post(f"{daemon.url}/v1/responses", timeout=60, json={
        "model": "agent", "input": "Hi", "max_output_tokens": 2, "stream": True, "reasoning": {"effort": "low"}})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "reasoning.effort"
    m = httpx.post(f"{daemon.url}/v1/messages", timeout=60, json={
        "model": "agent", "max_tokens": 2, "messages": msgs, "output_config": {"effort": "high"}})
    assert m.status_code == 400 and m.json()["type"] == "error"
    assert "output_config.effort" in m.json()["error"]["message"]
    assert client.responses.create(model="agent", input="Hi", max_output_tokens=2,
                                   reasoning={"effort": "none"}).status == "incomplete"
    assert client.chat.completions.create(model="thinker", messages=msgs, max_tokens=2,
                                          reasoning_effort="high").choices[0].finish_reason == "length"


def test_late_system_messages_are_merged_for_a_template_that_insists(client):
    late = client.chat.completions.create(model="thinker", max_tokens=1, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Be kind."}])
    merged = client.chat.completions.create(model="thinker", max_tokens=1, messages=[
        {"role": "system", "content": "Be brief.\n\nBe kind."}, {"role": "user", "content": "Hi"}])
    assert late.usage.prompt_tokens == merged.usage.prompt_tokens


def test_max_tokens_is_clamped_to_the_room_left(client, daemon):
    """A 512-token context: 32000 asked, the answer ends at the context's end with 'length'."""
    long = "Count: " + " ".join(str(i) for i in range(1, 140))
    r = client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": long}],
                                       max_tokens=32000)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 512
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": long * 2}])
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user"}]}, "messages.0"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"chat_template_kwargs": {"return_dict": True}}, "chat_template_kwargs"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "read", "arguments": "{nope"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
])
def test_bad_tool_fields_are_400_naming_the_field(daemon, extra, param):
    body = {"model": "agent", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS[:1], **extra}
    r = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_logprobs_streamed_and_not(client):
    kw = dict(model="agent", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=5,
              logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token          # greedy: the chosen token is the most likely
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_completions_logprobs_is_400_not_ignored(daemon):
    r = httpx.post(f"{daemon.url}/v1/completions", json={"model": "agent", "prompt": "hi", "logprobs": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_content_parts_developer_and_late_system_messages(client):
    """Text parts joined, developer rendered as system, a late system message kept in place (SmolLM2's
    template takes it): the same tokens as the prompt written out by hand, so that one (a plain
    completion) is a full cache hit with the same greedy answer."""
    chat = client.chat.completions.create(model="agent", max_tokens=8, messages=[
        {"role": "developer", "content": "Answer in one word, dear agent."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of Peru?"}]},
        {"role": "system", "content": "Be polite."},
    ])
    plain = client.completions.create(model="agent", max_tokens=8, prompt=(
        "<|im_start|>system\nAnswer in one word, dear agent.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n"
        "<|im_start|>system\nBe polite.<|im_end|>\n<|im_start|>assistant\n"))
    assert chat.choices[0].message.content and chat.choices[0].message.refusal is None
    assert plain.usage.prompt_tokens == chat.usage.prompt_tokens
    # Every prompt token but the last (always computed) is the chat request's.
    assert plain.usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens - 1, plain.usage
    assert plain.choices[0].text == chat.choices[0].message.content


def _validates(call_name: str, arguments: str) -> dict:
    import jsonschema

    args = json.loads(arguments)
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call_name)
    jsonschema.validate(args, schema)
    return args


def test_tool_choice_required_forces_a_valid_call_streamed(client):
    """Left free, the model answers in prose; `required` makes it call a tool, and the SDK's
    own stream accumulator reassembles the call."""
    kw = dict(model="agent", messages=[{"role": "user", "content": "How many files are in this folder?"}],
              tools=TOOLS, max_tokens=80)
    free = client.chat.completions.create(**kw)
    assert free.choices[0].message.tool_calls is None            # what `required` must change
    with client.chat.completions.stream(**kw, tool_choice="required", parallel_tool_calls=False) as s:
        final = s.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name in {t["function"]["name"] for t in TOOLS}
    _validates(call.function.name, call.function.arguments)
    assert not (choice.message.content or "").strip()


def test_named_tool_choice_calls_that_function(client):
    kw = dict(model="agent", messages=[{"role": "user", "content": "How many files are in this folder?"}],
              tools=TOOLS, max_tokens=60)
    for name in ("bash", "glob"):
        r = client.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": name}})
        assert r.choices[0].finish_reason == "tool_calls"
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == name
        _validates(name, call.function.arguments)
        s = stream(client, **kw, tool_choice={"type": "function", "function": {"name": name}})
        assert [(c["name"], c["arguments"]) for c in s["calls"]] == [(name, call.function.arguments)]


def test_forced_call_beside_a_free_request_leaves_the_free_one_unchanged(client):
    """Constrained and unconstrained requests in one batch: the free one's greedy output is
    what it is alone."""
    from concurrent.futures import ThreadPoolExecutor

    free = dict(model="agent", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=24)
    forced = dict(model="agent", messages=[{"role": "user", "content": "List the files."}], tools=TOOLS,
                  tool_choice="required", max_tokens=60)
    alone = client.chat.completions.create(**free).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(client.chat.completions.create, **forced) for _ in range(2)]
        beside = pool.submit(client.chat.completions.create, **free)
        calls = [f.result().choices[0].message.tool_calls for f in futs]
    assert beside.result().choices[0].message.content == alone
    assert all(c for c in calls)
