"""Grammars in-process on the real model: tool-call grammars under mlx-lm's BatchGenerator,
the logits processor's reasoning and error paths, and the engine compiling off its step."""

from __future__ import annotations

import json
import re
import threading
from types import SimpleNamespace

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator

from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.worker.engine import Engine
from daemon.worker.grammar import (Compiler, GrammarError, GrammarProcessor, json_object_grammar, reasoning_end,
                                   tool_call_grammar)

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
EMAIL = {"type": "object", "properties": {
    "to": {"type": "string"}, "subject": {"type": "string"}, "urgent": {"type": "boolean"}},
    "required": ["to", "subject", "urgent"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "send_email", "description": "Send an email",
                                           "parameters": EMAIL}}]
SCHEMAS = {"get_weather": WEATHER, "send_email": EMAIL}
SYSTEM = ("You can call these tools by replying <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>:\n"
          + "\n".join(json.dumps(t["function"]) for t in TOOLS))
ASK = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the weather like in Lyon?"}]
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@pytest.fixture(scope="module")
def lm():
    from mlx_lm import load

    resolved = resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE)
    return load(str(resolved.path))


@pytest.fixture(scope="module")
def compiler(lm):
    return Compiler(lm[1], lm[0].args.vocab_size)


def processor(lm, compiler, grammar, **kw):
    matcher = compiler.compile(grammar, "tools").result(timeout=60)
    return GrammarProcessor(matcher, lm[0].args.vocab_size, lm[1].eos_token_id, **kw)


def generate(lm, compiler, grammars, messages, max_tokens) -> list[str]:
    """Greedy, one batch: one sequence per grammar (None: unconstrained) and its max_tokens."""
    model, tok = lm
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tok.eos_token_ids], completion_batch_size=8,
                         prefill_batch_size=8)
    procs = [[processor(lm, compiler, g)] if g else [] for g in grammars]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    uids = gen.insert([list(prompt) for _ in grammars], max_tokens=max_tokens, logits_processors=procs)
    out: dict[int, list[int]] = {u: [] for u in uids}
    finished: dict[int, str] = {}
    while len(finished) < len(uids):
        for r in gen.next()[1]:
            if r.token not in tok.eos_token_ids:
                out[r.uid].append(r.token)
            if r.finish_reason:
                finished[r.uid] = r.finish_reason
    assert all(finished[u] == "stop" for u in uids if grammars[uids.index(u)]), finished
    return [tok.decode(out[u]) for u in uids]


def parse_calls(text: str) -> list[dict]:
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>"), text
    return [json.loads(body) for body in CALL.findall(text)]


def test_forced_tool_calls_are_listed_tools_with_valid_arguments(lm, compiler):
    required = tool_call_grammar(TOOLS, "required", "<tool_call>", "</tool_call>", parallel=False)
    named = tool_call_grammar(TOOLS, {"name": "send_email"}, "<tool_call>", "</tool_call>", parallel=False)
    free, req, nam = generate(lm, compiler, [None, required, named], ASK, [6, 80, 80])
    print(free, req, nam, sep="\n")
    assert not free.startswith("<tool_call>")     # left alone, the model does not call a tool
    for text, names in ((req, set(SCHEMAS)), (nam, {"send_email"})):
        (call,) = parse_calls(text)
        assert set(call) == {"name", "arguments"} and call["name"] in names, text
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])


def test_parallel_allows_several_calls_and_single_exactly_one(lm, compiler):
    tok = lm[1]
    one = '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}</tool_call>'
    two = one + '\n<tool_call>\n{"name": "send_email", "arguments": {"to": "a@b.c", "subject": "hi", ' \
                '"urgent": false}}\n</tool_call>'
    for parallel, text, ok in ((True, two, True), (False, one, True), (False, two, False)):
        m = compiler.compile(tool_call_grammar(TOOLS, "required", "<tool_call>", "</tool_call>", parallel),
                             "tools").result(timeout=60)
        consumed = m.consume_tokens(tok.encode(text, add_special_tokens=False))
        assert (consumed and not m.is_error() and m.is_accepting()) == ok, (parallel, m.get_error())
    m = compiler.compile(tool_call_grammar(TOOLS, "required", "<tool_call>", "</tool_call>", False),
                         "tools").result(timeout=60)
    bad = one.replace('"celsius"', '"kelvin"')      # outside the tool's enum
    assert not (m.consume_tokens(tok.encode(bad, add_special_tokens=False)) and not m.is_error())


def test_named_choice_in_openai_form_allows_only_that_tool(lm, compiler):
    choice = {"type": "function", "function": {"name": "send_email"}}
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}</tool_call>'
    m = compiler.compile(tool_call_grammar(TOOLS, choice, "<tool_call>", "</tool_call>", False),
                         "tools").result(timeout=60)
    m.consume_tokens(lm[1].encode(call, add_special_tokens=False))
    assert m.is_error()


def test_special_token_markers_are_matched_as_tokens(lm, compiler):
    g = tool_call_grammar(TOOLS, "required", "<|im_start|>", "<|endoftext|>", False, special={"<|im_start|>"})
    m = compiler.compile(g, "tools").result(timeout=60)
    assert m.consume_token(lm[1].convert_tokens_to_ids("<|im_start|>")) and not m.is_error()


def test_tool_choice_errors_name_their_field():
    with pytest.raises(GrammarError) as e:
        tool_call_grammar(TOOLS, {"name": "launch_rocket"}, "<tool_call>", "</tool_call>", False)
    assert e.value.param == "tool_choice"
    with pytest.raises(GrammarError) as e:
        tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "required",
                          "<tool_call>", "</tool_call>", False)
    assert e.value.param == "tools"


def finite(logits) -> int:
    return int(mx.isfinite(logits).sum().item())


def test_constraint_starts_after_the_reasoning(lm, compiler):
    tok = lm[1]
    end = tok.encode(" END", add_special_tokens=False)
    proc = processor(lm, compiler, json_object_grammar(), think_end=end)
    vocab = lm[0].args.vocab_size
    logits = mx.zeros((1, vocab))
    ctx = list(tok.encode("Think first."))
    assert finite(proc(mx.array(ctx), logits)) == vocab               # reasoning: free
    ctx += tok.encode(" Hmm", add_special_tokens=False)
    assert finite(proc(mx.array(ctx), logits)) == vocab
    for t in end:
        ctx.append(t)
        n = finite(proc(mx.array(ctx), logits))
    assert 0 < n < 10                                                   # the answer must open a JSON object
    assert proc.error is None


def test_reasoning_end_follows_the_prompt():
    stub = SimpleNamespace(has_thinking=True, think_end_tokens=(9,),
                           rfind_think_start=lambda p: p.index(8) if 8 in p else -1,
                           rfind_think_end=lambda p: p.index(9) if 9 in p else -1)
    assert reasoning_end(stub, [1, 8, 5]) == (9,)          # the prompt opens reasoning
    assert reasoning_end(stub, [1, 8, 5, 9, 2]) is None    # ... and closes it
    assert reasoning_end(stub, [1, 5]) is None


def test_matcher_error_forces_eos_and_never_raises(lm, compiler):
    tok = lm[1]
    proc = processor(lm, compiler, '%llguidance {}\nstart: "a"')
    logits = mx.zeros((1, lm[0].args.vocab_size))
    ctx = list(tok.encode("Say a."))
    proc(mx.array(ctx), logits)
    out = proc(mx.array(ctx + tok.encode("b", add_special_tokens=False)), logits)
    assert proc.error and "doesn't satisfy the grammar" in proc.error
    assert finite(out) == 1 and out[0, tok.eos_token_id].item() == 0.0


# -- the engine: compiling off the step, failures contained ------------------------------------------

@pytest.fixture
def engine(lm):
    return Engine(lm[0], lm[1], max_batch_size=4, prefill_batch_size=4, prefill_step_size=512,
                  context_length=2048, default_max_tokens=32)


def submit(eng, rid, **kw):
    return eng.submit({"id": rid, "messages": [{"role": "user", "content": "Describe a cat in JSON."}], **kw})


SMALL = {"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": {
    "type": "object", "properties": {"pet": {"enum": ["cat", "dog"]}}, "required": ["pet"],
    "additionalProperties": False}}}}


def run(eng, events=None, until=None, steps=10_000):
    """Step the engine, collecting events by request id, until `until(events)` or nothing is left."""
    events = events if events is not None else {}
    for _ in range(steps):
        if until is not None and until(events):
            break
        if not eng.busy:
            if not eng.parked:
                break
            threading.Event().wait(0.01)
            continue
        for ev in eng.step():
            events.setdefault(ev["id"], []).append(ev)
    return events


def text(evs) -> str:
    return "".join(e["text"] for e in evs if e["op"] == "text")


def test_engine_decodes_others_while_a_grammar_compiles(engine):
    engine.compiler = Compiler(engine.tokenizer, engine._vocab_size())
    gate, woke = threading.Event(), threading.Event()
    engine.compiler._pool.submit(gate.wait)        # the compiler's thread is busy until the gate opens
    engine.wake = woke.set
    try:
        assert submit(engine, "free", max_tokens=24)["op"] == "started"
        assert submit(engine, "json", max_tokens=48, **SMALL) is None
        events = run(engine, until=lambda evs: len([e for e in evs.get("free", []) if e["op"] == "text"]) >= 3)
        assert "json" not in events and "json" in engine.parked      # decoding went on without it
    finally:
        gate.set()      # a failure must not leave the compiler's thread blocked (pytest would hang at exit)
    assert woke.wait(60)
    run(engine, events)
    assert events["json"][0]["op"] == "started" and events["json"][-1]["op"] == "done"
    assert json.loads(text(events["json"]))["pet"] in ("cat", "dog")
    assert events["free"][-1]["finish_reason"] == "length"


def test_uncompilable_grammar_and_cancel_while_compiling(engine):
    bad = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}
    assert submit(engine, "bad", **bad) is None
    (err,) = run(engine)["bad"]
    assert (err["op"], err["status"], err["param"]) == ("error", 400, "response_format")
    assert "nope" in err["message"]
    gate = threading.Event()
    engine.compiler._pool.submit(gate.wait)
    try:
        assert submit(engine, "gone", **SMALL) is None
        done = engine.cancel("gone")
    finally:
        gate.set()
    assert done["finish_reason"] == "cancelled" and not engine.parked and not engine.busy


class Eager(Compiler):
    """The real compiler, but each compile has finished (or failed) by the time `compile` returns."""

    def compile(self, *args):
        fut = super().compile(*args)
        fut.exception(timeout=60)
        return fut


def test_grammar_error_that_finished_before_start_is_a_400(engine):
    from daemon.worker.__main__ import handle

    engine.compiler = Eager(engine.tokenizer, engine._vocab_size())
    bad = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}
    err = handle(engine, {"op": "submit", "id": "bad", "messages": [{"role": "user", "content": "Hi"}], **bad})
    assert (err["op"], err["status"], err["param"]) == ("error", 400, "response_format") and "nope" in err["message"]
    assert engine.internal_errors == 0 and not engine.parked


def test_matcher_failure_fails_only_its_request(engine, lm, compiler):
    submit(engine, "free", max_tokens=24)
    submit(engine, "json", max_tokens=48, **SMALL)
    events = run(engine, until=lambda evs: any(e["op"] == "text" for e in evs.get("json", [])))
    (a,) = [a for a in engine.active.values() if a.id == "json"]
    # The next token, allowed by the JSON grammar, is refused by this one: the matcher errors.
    a.grammar.matcher = compiler.compile('%llguidance {}\nstart: "zzz"', "tools").result(timeout=60)
    run(engine, events)
    err = events["json"][-1]
    assert (err["op"], err["status"], err["code"]) == ("error", 500, "grammar_error")
    assert events["free"][-1]["op"] == "done" and events["free"][-1]["finish_reason"] == "length"
    assert not engine.active and not engine.busy
