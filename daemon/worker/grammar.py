"""Grammar-constrained decoding: llguidance matchers as per-sequence logits processors.

A constrained request joins the running batch like any other; only its own row of the
logits is masked, so its neighbours are untouched. Grammars are llguidance grammar strings
(JSON schemas, or Lark with `%json{...}` for tool calls), compiled into matchers on a
thread (`Compiler`) so the engine keeps decoding while one compiles. The mask is computed
with llguidance's numpy API and applied with plain MLX ops on every device (`llguidance.mlx`
is a Metal kernel, untestable here; the mask is ~0.1 ms per token, not worth a second path).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Collection, Optional, Sequence

import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance import LLMatcher
from llguidance.numpy import fill_next_token_bitmask

log = logging.getLogger("mlxd.worker")


class GrammarError(ValueError):
    """A grammar that cannot be compiled; `param` names the request field it came from."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


# -- grammars (llguidance grammar strings) ---------------------------------------------------

# Whitespace between JSON tokens as the model likes, but bounded: a small model stuck emitting
# newlines must get back to the JSON. 64 covers pretty-printing 16 levels deep.
WHITESPACE = r"[\x20\x0A\x0D\x09]{1,64}"
JSON_OPTIONS = {"whitespace_pattern": WHITESPACE}


def json_schema_grammar(schema: dict) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except BaseException as e:      # ValueError for a bad schema; a pyo3 panic is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise GrammarError(f"invalid JSON schema: {e}") from None


def json_object_grammar() -> str:
    return json_schema_grammar({"type": "object"})


def _literal(text: str, special: Collection[str]) -> str:
    """A Lark terminal for `text`: the special token of that name if listed in `special`, else its bytes."""
    return text if text in special else json.dumps(text)


def tool_call_grammar(tools: Sequence[dict], choice: Any, call_start: str, call_end: str,
                      parallel: bool, *, special: Collection[str] = ()) -> str:
    """Output that is one call (or, if `parallel`, one or more) of a listed tool:
    `<call_start>{"name": "<tool>", "arguments": <JSON of its parameters schema>}<call_end>`.

    `choice` is "required" (any listed tool) or {"name": ...} (that one; OpenAI's
    {"type": "function", "function": {"name": ...}} too). Markers listed
    in `special` (e.g. "<tool_call>" on Qwen, where it is one special token) are matched
    as special tokens. Each tool's schema is its own `%json{}`, so its `$ref`s still resolve.
    """
    by_name: dict[str, dict] = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GrammarError("every tool needs a function name", param="tools")
        params = fn.get("parameters")
        if params is None:      # OpenAI: no parameters means an empty parameter list
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise GrammarError(f"tool {fn['name']!r}: parameters must be a JSON schema object", param="tools")
        by_name[fn["name"]] = params
    named = choice.get("name", (choice.get("function") or {}).get("name")) if isinstance(choice, dict) else None
    if choice == "required":
        names = list(by_name)
    elif isinstance(named, str):      # {"name": ...} or OpenAI's {"type": "function", "function": {...}}
        if named not in by_name:
            raise GrammarError(f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
        names = [named]
    else:
        raise GrammarError('tool_choice must be "required" or {"name": ...}', param="tool_choice")
    if not names:
        raise GrammarError("tools is empty", param="tools")
    rules = []
    for i, name in enumerate(names):
        rules.append(f'fn_{i}: "{{" WS? "\\"name\\"" WS? ":" WS? {json.dumps(json.dumps(name))} WS? "," WS? '
                     f'"\\"arguments\\"" WS? ":" WS? args_{i} WS? "}}"')
        rules.append(f"args_{i}: %json{json.dumps({'x-guidance': JSON_OPTIONS, **by_name[name]})}")
    calls = "call (WS? call)*" if parallel else "call"
    return "\n".join([
        f"start: {calls}",
        f"call: {_literal(call_start, special)} WS? ({' | '.join(f'fn_{i}' for i in range(len(names)))}) "
        f"WS? {_literal(call_end, special)}",
        *rules,
        "WS: /[ \\t\\r\\n]{1,64}/",
    ])


def request_grammar(msg: dict) -> Optional[tuple[str, str]]:
    """The grammar a submitted request asks for and the field that asked, or None."""
    rf = msg.get("response_format")
    if not rf or rf.get("type") == "text":
        return None
    if rf["type"] == "json_object":
        return json_object_grammar(), "response_format"
    if rf["type"] == "json_schema":
        try:
            return json_schema_grammar(rf["json_schema"]["schema"]), "response_format"
        except GrammarError as e:
            e.param = "response_format"
            raise
    raise GrammarError(f"unknown response_format type {rf['type']!r}", param="response_format")


def reasoning_end(tokenizer, prompt: Sequence[int]) -> Optional[Sequence[int]]:
    """The think-end marker's tokens if the prompt leaves the model reasoning, else None:
    the constraint applies to the answer, never inside the reasoning."""
    if not getattr(tokenizer, "has_thinking", False):
        return None
    if tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        return tokenizer.think_end_tokens
    return None


# -- compiling, off the engine's thread ---------------------------------------------------------

class Compiler:
    """Builds matchers on one thread; the llguidance tokenizer is built there once, on first use."""

    def __init__(self, tokenizer, vocab_size: int):
        self._hf = tokenizer
        self._vocab = vocab_size
        self._lltok = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    def compile(self, grammar: str, param: str) -> "Future":
        """A future of an `LLMatcher`, or of the GrammarError naming `param`."""
        return self._pool.submit(self._compile, grammar, param)

    def _compile(self, grammar: str, param: str):
        if self._lltok is None:
            self._lltok = llguidance.hf.from_tokenizer(
                self._hf._tokenizer, n_vocab=self._vocab, eos_token=sorted(self._hf.eos_token_ids))
        try:
            m = LLMatcher(self._lltok, grammar, log_level=0)
        except BaseException as e:      # pyo3 turns a Rust panic into a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise GrammarError(f"{param} cannot be compiled into a grammar: {e}", param=param) from None
        if m.is_error():
            raise GrammarError(f"{param} cannot be compiled into a grammar: {m.get_error()}", param=param)
        return m


# -- the logits processor ---------------------------------------------------------------------------

_SHIFTS = mx.arange(32, dtype=mx.int32)


class GrammarProcessor:
    """One request's matcher as an mlx-lm logits processor: `proc(tokens, logits) -> logits`.

    mlx-lm calls it once per decode step with the sequence's tokens so far (the prompt on the
    first call, then each sampled token appended), so from the second call on `tokens[-1]` is
    the token sampled under the previous mask: it is consumed before the next mask. With
    `think_end` (token ids) the constraint starts once the model has generated that marker.
    It never raises into the batch: a matcher error is kept in `error` and ends the sequence
    with EOS, which the engine turns into an error for this request only.
    """

    def __init__(self, matcher, vocab_size: int, eos: int, think_end: Optional[Sequence[int]] = None):
        self.matcher = matcher
        self.eos = eos
        self.error: Optional[str] = None
        self._think_end = list(think_end) if think_end else None
        self._recent: list[int] = []
        self._first = True
        self._mask = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        try:
            return self._process(tokens, logits)
        except BaseException as e:  # a bug (or a Rust panic) fails this request, not the batch
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            log.exception("grammar processor failed")
            self.error = f"constrained decoding failed: {type(e).__name__}: {e}"
            return self._only_eos(logits)

    def _process(self, tokens: mx.array, logits: mx.array) -> mx.array:
        first, self._first = self._first, False
        if not first:
            # Start this step's forward pass before waiting for the previous token, so the
            # matcher's work below overlaps the model instead of adding to it.
            mx.async_eval(logits)
            tok = tokens[-1].item()
            if self._think_end is not None:
                self._recent = (self._recent + [tok])[-len(self._think_end):]
                if self._recent == self._think_end:
                    self._think_end = None      # the answer, constrained, starts with this step's token
            elif self.error is None:
                self.matcher.consume_token(tok)
        if self._think_end is not None:
            return logits
        if self.error is None and self.matcher.is_error():
            self.error = f"constrained decoding failed: {self.matcher.get_error().splitlines()[0]}"
        if self.error is not None:
            return self._only_eos(logits)
        fill_next_token_bitmask(self.matcher, self._mask)
        bits = (mx.array(self._mask)[..., None] >> _SHIFTS) & 1
        allowed = bits.reshape(1, -1)[:, : logits.shape[-1]]
        return mx.where(allowed.astype(mx.bool_), logits, -mx.inf)

    def _only_eos(self, logits: mx.array) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == self.eos, 0.0, -mx.inf)[None].astype(logits.dtype)
