"""Generated tokens -> typed events (daemon/worker/output.py, tools.py) on the real tokenizer.

Model outputs are written as text, tokenized with SmolLM2's tokenizer and fed one token at a
time, as the engine does: what comes out must be the right events, with no markup in text
and a call's arguments streamed in pieces that concatenate to what mlx-lm's parser reads.
"""

from __future__ import annotations

import json

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.tool_parsers import json_tools, qwen3_coder

from conftest import TEST_CACHE
from daemon.events import Reasoning, Text, ToolArgs, ToolCall
from daemon.models import resolve_model
from daemon.worker import tools as toolfmt
from daemon.worker.output import THINK, Markers, Output, initial_state, state_machine

TOOLS = [
    {"type": "function", "function": {"name": "write", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "integer"},
        "flags": {"type": "array"}}}}},
    {"type": "function", "function": {"name": "read", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}}}}},
]
FILE = 'def main():\n    print("hi\\n", {"a": 1})\n    return {}\n\n\nmain()\n'


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE).path


@pytest.fixture(scope="module")
def tok(model_path):
    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def qwen_tok(model_path):
    return load_tokenizer(model_path, tokenizer_config_extra={"tool_parser_type": "qwen3_coder"})


def run(tok, text, *, think=None, tools=True, call_class=toolfmt.JsonCall, parser=json_tools.parse_tool_call,
        prompt="", parallel=True, stop=(), reason="stop"):
    """Feed `text` token by token; returns (events, per-token event lists, finish reason)."""
    markers = Markers(think, ("<tool_call>", "</tool_call>") if tools else None)
    out = Output("r", tok.detokenizer, list(stop), state_machine(tok, markers),
                 initial_state(tok, markers, prompt), call_class, parser, TOOLS, parallel)
    steps = []
    for t in tok.encode(text, add_special_tokens=False):
        steps.append(out.add(t))
        if out.stopped:
            break
    tail, reason = out.finish(reason)
    steps.append(tail)
    return [e for s in steps for e in s], steps, reason


def text_of(events, cls=Text):
    return "".join(e.text for e in events if isinstance(e, cls))


def calls_of(events):
    calls = {}
    for e in events:
        if isinstance(e, ToolCall):
            assert e.index == len(calls) and e.call_id.startswith("call_")
            calls[e.index] = [e.name, ""]
        elif isinstance(e, ToolArgs):
            calls[e.index][1] += e.arguments
    return [tuple(c) for c in calls.values()]


def test_plain_text_passes_through(tok):
    events, _, reason = run(tok, "Hello <b>world</b>, x < y.")
    assert text_of(events) == "Hello <b>world</b>, x < y." and reason == "stop"


def test_fallback_call_streams_arguments_while_written(tok):
    args = json.dumps({"path": "main.py", "content": FILE})
    block = f'{{"name": "write", "arguments": {args}}}'
    events, steps, reason = run(tok, f"I will write it.\n<tool_call>\n{block}\n</tool_call>")
    assert reason == "tool_calls"
    assert text_of(events) == "I will write it.\n"
    [(name, streamed)] = calls_of(events)
    assert name == "write" and streamed == args
    assert json.loads(streamed) == json_tools.parse_tool_call(block)["arguments"]
    deltas = [e for e in events if isinstance(e, ToolArgs)]
    assert len(deltas) > 10                       # many pieces, not one at the end
    first_args = next(i for i, s in enumerate(steps) if any(isinstance(e, ToolArgs) for e in s))
    assert first_args < len(steps) // 2
    # the call's id and name come before any of its arguments
    assert isinstance(next(e for e in events if isinstance(e, (ToolCall, ToolArgs))), ToolCall)


def test_no_markup_or_partial_marker_reaches_text(tok):
    events, steps, _ = run(tok, '<tool_call>\n{"name": "read", "arguments": {"path": "a"}}\n</tool_call>\n'
                                '<tool_call>\n{"name": "read", "arguments": {"path": "b"}}\n</tool_call>')
    assert calls_of(events) == [("read", '{"path": "a"}'), ("read", '{"path": "b"}')]
    assert text_of(events) == ""                  # the newline between calls is not content
    for s in steps:
        for e in s:
            if isinstance(e, Text):
                assert "<" not in e.text


def test_parallel_false_stops_after_the_first_call(tok):
    events, _, reason = run(tok, '<tool_call>\n{"name": "read", "arguments": {"path": "a"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "read", "arguments": {"path": "b"}}\n</tool_call>',
                            parallel=False)
    assert calls_of(events) == [("read", '{"path": "a"}')] and reason == "tool_calls"


def test_reasoning_then_answer(tok):
    events, _, reason = run(tok, "<think>\nThe user wants Paris.\n</think>\n\nParis.", think=THINK)
    assert text_of(events, Reasoning) == "\nThe user wants Paris.\n"
    assert text_of(events) == "\n\nParis." and reason == "stop"


def test_prompt_that_opened_think_starts_in_reasoning(tok):
    events, _, _ = run(tok, "Hmm, France.</think>Paris.", think=THINK, prompt="<|im_start|>assistant\n<think>\n")
    assert text_of(events, Reasoning) == "Hmm, France." and text_of(events) == "Paris."
    events, _, _ = run(tok, "Paris.", think=THINK, prompt="<think>x</think> earlier turn")
    assert text_of(events) == "Paris." and not text_of(events, Reasoning)


def test_tool_call_inside_reasoning_is_a_call(tok):
    events, _, reason = run(tok, '<think>I should read it.<tool_call>\n{"name": "read", "arguments": {"path": "a"}}'
                                 '\n</tool_call>', think=THINK)
    assert text_of(events, Reasoning) == "I should read it."
    assert calls_of(events) == [("read", '{"path": "a"}')] and reason == "tool_calls"
    assert text_of(events) == ""


def test_call_cut_by_length_keeps_what_was_written(tok):
    events, _, reason = run(tok, '<tool_call>\n{"name": "write", "arguments": {"path": "a", "content": "abc',
                            reason="length")
    [(name, args)] = calls_of(events)
    assert name == "write" and args == '{"path": "a", "content": "abc' and reason == "length"


def test_partial_marker_cut_by_length_is_not_content(tok):
    events, _, reason = run(tok, "The answer is <tool_", reason="length")
    assert text_of(events) == "The answer is " and reason == "length"
    events, _, _ = run(tok, "Hmm </thi", think=THINK, prompt="<think>", reason="length")
    assert text_of(events, Reasoning) == "Hmm " and not text_of(events)


def test_arguments_as_a_json_string(tok):
    events, _, _ = run(tok, '<tool_call>{"name": "read", "arguments": "{\\"path\\": \\"a\\"}"}</tool_call>')
    assert calls_of(events) == [("read", '{"path": "a"}')]


def test_unparsable_block_keeps_its_words_without_markup(tok):
    events, _, reason = run(tok, "<tool_call>I cannot call tools</tool_call>")
    assert calls_of(events) == [] and text_of(events) == "I cannot call tools" and reason == "stop"


def test_stop_string_cuts_before_the_state_machine(tok):
    events, _, reason = run(tok, "One. Two. Three.", stop=[" Two"])
    assert text_of(events) == "One." and reason == "stop"


def test_without_tools_markup_is_text(tok):
    events, _, _ = run(tok, "<tool_call>x</tool_call>", tools=False)
    assert text_of(events) == "<tool_call>x</tool_call>"


def qwen_block(**params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function=write>\n{body}</function>\n</tool_call>"


def test_qwen3_coder_streams_string_values_and_converts_the_others(qwen_tok):
    assert toolfmt.parser_name(qwen_tok) == "qwen3_coder"
    block = qwen_block(path="src/main.py", content=FILE, mode="420", flags='["x", 2]')
    events, steps, reason = run(qwen_tok, "Writing.\n" + block, call_class=toolfmt.Qwen3CoderCall,
                                parser=qwen_tok.tool_parser)
    [(name, streamed)] = calls_of(events)
    expected = qwen3_coder.parse_tool_call(block.removeprefix("<tool_call>").removesuffix("</tool_call>"), TOOLS)
    assert name == "write" and json.loads(streamed) == expected["arguments"]
    assert json.loads(streamed)["content"] == FILE
    assert len([e for e in events if isinstance(e, ToolArgs)]) > 10
    assert text_of(events) == "Writing.\n" and reason == "tool_calls"


def test_qwen3_coder_cut_short_is_still_json(qwen_tok):
    events, _, _ = run(qwen_tok, "<tool_call>\n<function=write>\n<parameter=path>\na.py\n</parameter>\n"
                                 "<parameter=content>\nprint(1)", call_class=toolfmt.Qwen3CoderCall,
                       parser=qwen_tok.tool_parser, reason="length")
    [(_, streamed)] = calls_of(events)
    assert json.loads(streamed) == {"path": "a.py", "content": "print(1)"}


def test_other_formats_arrive_whole_when_the_call_closes(tok):
    """A format without a streaming parser (here json_tools read by WholeCall) still gives a call."""
    events, _, _ = run(tok, '<tool_call>{"name": "read", "arguments": {"path": "a"}}</tool_call>',
                       call_class=toolfmt.WholeCall)
    assert calls_of(events) == [("read", '{"path": "a"}')]


def test_fallback_renders_history_in_the_format_the_model_writes():
    msgs = toolfmt.fallback_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Read a"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "read", "arguments": '{"path": "a"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "c2", "content": "B"},
    ], TOOLS)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(TOOLS[0]) in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": toolfmt.render_call("read", '{"path": "a"}')}
    assert msgs[2]["content"] == '<tool_call>\n{"name": "read", "arguments": {"path": "a"}}\n</tool_call>'
    assert msgs[3] == {"role": "user", "content": "<tool_response>\nA\n</tool_response>\n"
                                                  "<tool_response>\nB\n</tool_response>"}
    with pytest.raises(toolfmt.BadArguments) as e:
        toolfmt.fallback_messages([{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "read", "arguments": "{nope"}}]}], None)
    assert e.value.param == "messages.0.tool_calls.0.function.arguments"


def test_merge_system_keeps_order():
    merged = toolfmt.merge_system([{"role": "system", "content": "A"}, {"role": "user", "content": "u"},
                                   {"role": "system", "content": "B"}])
    assert merged == [{"role": "system", "content": "A\n\nB"}, {"role": "user", "content": "u"}]


def test_qwen3_coder_odd_values_and_schemas_stay_json(qwen_tok):
    """A value its declared type cannot hold, and a client's schema of the wrong shape."""
    block = qwen_block(path="a.py", mode="4.5")
    events, _, _ = run(qwen_tok, block, call_class=toolfmt.Qwen3CoderCall, parser=qwen_tok.tool_parser)
    [(_, streamed)] = calls_of(events)
    assert json.loads(streamed) == {"path": "a.py", "mode": "4.5"}
    odd = [{"type": "function", "function": {"name": "write", "parameters": {"properties": {"mode": 5}}}}]
    call = toolfmt.Qwen3CoderCall(qwen_tok.tool_parser, odd)
    items = call.feed(block.removeprefix("<tool_call>").removesuffix("</tool_call>")) + call.close()
    assert json.loads("".join(v for k, v in items if k == "args")) == {"path": "a.py", "mode": "4.5"}
