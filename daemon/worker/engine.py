"""Continuous batching for one model: mlx-lm's BatchGenerator plus the prefix cache.

Requests join the running batch at every step and leave it when they finish; each carries
its own sampler, max_tokens and stop strings, so nothing forces the batch to drain. A new
request starts from the longest cached prefix of its prompt and prefills only the rest;
a finished one gives its KV cache (prompt + completion) back to the prefix cache, so the
next turn of the same conversation hits.

Chat requests are rendered with the model's chat template, tools included (`tools.py`: the
template's own tool support, or the fallback format); each request's output goes through
`output.py`, which turns tokens into typed events (text, reasoning, tool-call deltas).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.tool_parsers import json_tools

from ..events import Done, Error, Logprob, Progress, Started
from . import tools as toolfmt
from .output import THINK, Markers, Output, initial_state, state_machine
from .sampling import make_sampler

log = logging.getLogger("mlxd.worker")


class RequestError(Exception):
    """A request the worker refuses; `code` becomes the OpenAI error code."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class Active:
    id: str
    uid: int
    prompt_tokens: int
    cached_tokens: int
    max_tokens: int
    out: Output
    t_submit: float
    t_first: Optional[float] = None
    t_prefill_start: Optional[float] = None
    t_last: Optional[float] = None
    generated: int = 0
    cache_tier: Optional[str] = None
    itl: list = field(default_factory=list)
    top_logprobs: Optional[int] = None      # None: no logprobs asked for


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int, prefill_batch_size: int,
                 prefill_step_size: int, context_length: int, default_max_tokens: int,
                 prefix_cache: Any = None, reasoning_parser: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.default_max_tokens = default_max_tokens
        self.prefix_cache = prefix_cache
        self.eos = set(tokenizer.eos_token_ids)
        self.gen = BatchGenerator(
            model,
            max_tokens=default_max_tokens,
            stop_tokens=[[t] for t in sorted(self.eos)],
            completion_batch_size=max_batch_size,
            prefill_batch_size=min(prefill_batch_size, max_batch_size),
            prefill_step_size=prefill_step_size,
        )
        self.active: dict[int, Active] = {}
        self.uid_of: dict[str, int] = {}
        self.decoding: set[int] = set()
        # Output formats: the tokenizer's (mlx-lm infers them from the template and vocabulary,
        # the model's `tool_parser` config overrides), else the fallback tool format.
        self.native_tools = toolfmt.template_knows_tools(tokenizer)
        if tokenizer.has_tool_calling:
            self.tool_markers = (tokenizer.tool_call_start, tokenizer.tool_call_end)
            self.parser, self.parser_name = tokenizer.tool_parser, toolfmt.parser_name(tokenizer)
        else:
            self.tool_markers = (json_tools.tool_call_start, json_tools.tool_call_end)
            self.parser, self.parser_name = json_tools.parse_tool_call, toolfmt.FALLBACK_PARSER
        self.think = (tokenizer.think_start, tokenizer.think_end) if tokenizer.has_thinking else None
        if reasoning_parser == "think":
            self.think = THINK
        elif reasoning_parser == "none":
            self.think = None
        self._machines: dict[Markers, Any] = {}

    # -- requests ---------------------------------------------------------------------

    def render(self, msg: dict) -> str:
        """The chat template's prompt text, with tools, history calls and template kwargs."""
        tools = msg.get("tools") or None
        try:
            if self.native_tools:
                messages = toolfmt.native_messages(msg["messages"])
            else:
                messages = toolfmt.fallback_messages(msg["messages"], tools)
        except toolfmt.BadArguments as e:
            raise RequestError(str(e), param=e.param) from None
        kwargs = dict(msg.get("chat_template_kwargs") or {})
        kwargs.setdefault("enable_thinking", self.think is not None)   # mlx-lm's default, on our markers
        if msg.get("reasoning_effort") is not None:
            kwargs.setdefault("reasoning_effort", msg["reasoning_effort"])
        if tools and self.native_tools:
            kwargs["tools"] = tools
        try:
            try:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                          **kwargs)
            except Exception:
                merged = toolfmt.merge_system(messages)
                if merged == messages:
                    raise
                # A template that insists on one leading system message gets them all, in order.
                return self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False,
                                                          **kwargs)
        except Exception as e:  # jinja raises for roles/contents a template rejects
            raise RequestError(f"chat template rejected the messages: {e}", param="messages") from None

    def tokenize(self, msg: dict) -> tuple[list[int], str]:
        """The prompt's tokens, and its text for chat requests ("" otherwise)."""
        if "messages" in msg:
            text = self.render(msg)
            if not isinstance(text, str):
                raise RequestError("chat_template_kwargs made the template return no text", param="chat_template_kwargs")
            return list(self.tokenizer.encode(text, add_special_tokens=False)), text
        prompt = msg.get("prompt", "")
        if isinstance(prompt, list):
            vocab = getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer)
            bad = next((t for t in prompt if not 0 <= int(t) < vocab), None)
            if bad is not None:
                raise RequestError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
            return [int(t) for t in prompt], ""
        return list(self.tokenizer.encode(prompt)), ""

    def output(self, msg: dict, prompt_text: str) -> Output:
        """How this request's tokens become events: plain text, or chat with reasoning and tools."""
        stop = list(msg.get("stop") or [])
        detok = self.tokenizer.detokenizer
        if "messages" not in msg:
            return Output(msg["id"], detok, stop)
        tools = msg.get("tools") or None
        choice = msg.get("tool_choice") or "auto"
        if tools and choice == "none":
            stop.append(self.tool_markers[0])    # no calls: the answer ends where a call would start
        markers = Markers(self.think, self.tool_markers if tools and choice != "none" else None)
        if markers == Markers() and not (self.tokenizer.response_transitions or self.tokenizer.structural_markers):
            return Output(msg["id"], detok, stop)     # nothing to segment: plain text
        if markers not in self._machines:
            self._machines[markers] = state_machine(self.tokenizer, markers)
        return Output(msg["id"], detok, stop, self._machines[markers],
                      initial_state(self.tokenizer, markers, prompt_text), toolfmt.call_class(self.parser_name),
                      self.parser, tools, parallel=msg.get("parallel_tool_calls") is not False)

    def constraint(self, msg: dict) -> Optional[dict]:
        """What grammar-constrained decoding must enforce for this request, or None.

        `tool_choice` "required" or a named function, and `response_format` json_object or
        json_schema, arrive here unchanged; the tool format says what a call looks like.
        """
        choice, fmt = msg.get("tool_choice"), msg.get("response_format")
        forced = msg.get("tools") and (choice == "required" or isinstance(choice, dict))
        structured = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
        if not (forced or structured):
            return None
        return {"tool_choice": choice if forced else None, "response_format": fmt if structured else None,
                "tools": msg.get("tools"), "tool_markers": self.tool_markers, "tool_parser": self.parser_name,
                "think": self.think}

    def logits_processors(self, constraint: Optional[dict], tokens: list[int]) -> Optional[list]:
        """The seam for grammar.py: a constraint becomes per-request logits processors."""
        return None

    def submit(self, msg: dict) -> dict:
        """Queue a request; returns its `started` event (usage known up front)."""
        rid = msg["id"]
        tokens, prompt_text = self.tokenize(msg)
        if not tokens:
            raise RequestError("the prompt is empty", param="prompt")
        room = self.context_length - len(tokens)
        if room < 1:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"prompt has {len(tokens)} tokens, which leaves no room for a completion. Please reduce the prompt.",
                code="context_length_exceeded", param="messages" if "messages" in msg else "prompt")
        # Agents ask for more than any local context holds (opencode: 32000); the answer is
        # cut at the context's end with finish_reason "length", as if they had asked for that.
        max_tokens = min(int(msg.get("max_tokens") or self.default_max_tokens), room)
        out = self.output(msg, prompt_text)
        processors = self.logits_processors(self.constraint(msg), tokens)
        cache, n_cached, tier = (None, 0, None)
        if self.prefix_cache is not None:
            cache, n_cached, tier = self.prefix_cache.fetch(tokens)
        sampler = make_sampler(float(msg.get("temperature", 0.0)), float(msg.get("top_p", 1.0)), msg.get("seed"),
                               int(msg.get("top_k") or 0))
        extra = {"logits_processors": [processors]} if processors else {}
        (uid,) = self.gen.insert(
            [tokens[n_cached:]], max_tokens=[max_tokens], caches=[cache],
            all_tokens=[list(tokens[:n_cached])], samplers=[sampler], **extra)
        self.active[uid] = Active(
            id=rid, uid=uid, prompt_tokens=len(tokens), cached_tokens=n_cached, max_tokens=max_tokens,
            out=out, t_submit=time.perf_counter(), cache_tier=tier,
            top_logprobs=int(msg.get("top_logprobs") or 0) if msg.get("logprobs") else None)
        self.uid_of[rid] = uid
        return Started(rid, len(tokens), n_cached, max_tokens).wire()

    def cancel(self, rid: str) -> Optional[dict]:
        uid = self.uid_of.get(rid)
        if uid is None:
            return None
        caches = self.gen.remove([uid], return_prompt_caches=True)
        a = self._forget(uid)
        self._store(caches.get(uid))
        return self._done(a, "cancelled")

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def running(self) -> int:
        return len(self.decoding)

    @property
    def waiting(self) -> int:
        return len(self.active) - len(self.decoding)

    # -- the step loop ------------------------------------------------------------------

    def step(self) -> list[dict]:
        """One engine step: a prefill chunk and/or one decoded token for every sequence."""
        t0 = time.perf_counter()
        prompt_resps, gen_resps = self.gen.next()
        now = time.perf_counter()
        events: list[dict] = []
        for p in prompt_resps:
            a = self.active.get(p.uid)
            if a is None:
                continue
            if a.t_prefill_start is None:
                a.t_prefill_start = t0
            if p.end_of_prompt:
                self.decoding.add(p.uid)
            else:
                events.append(Progress(a.id, p.progress[0], p.progress[1]).wire())
        for r in gen_resps:
            a = self.active.get(r.uid)
            if a is None:
                continue
            try:
                events.extend(self._advance(a, r, now))
            except Exception as e:    # a bug reading one request's output fails that request, not the worker
                log.exception("request %s: output failed", a.id)
                if r.uid in self.active:
                    with contextlib.suppress(Exception):
                        self.gen.remove([r.uid])
                    self._forget(r.uid)
                events.append(Error(a.id, f"reading the model's output failed: {type(e).__name__}: {e}",
                                    code="output_error", status=500).wire())
        return events

    def _advance(self, a: Active, r, now: float) -> list[dict]:
        """One generated token of one request: its events, and its end if it ended."""
        a.generated += 1
        if a.t_first is None:
            a.t_first = now
        else:
            a.itl.append(round(now - a.t_last, 5))
        a.t_last = now
        reason = r.finish_reason
        eos = reason == "stop" and r.token in self.eos
        events = [self._logprob(a, r).wire()] if a.top_logprobs is not None and not eos else []
        out = [] if eos else a.out.add(r.token)
        cache = (r.prompt_cache, r.all_tokens) if reason else None
        if reason is None and a.out.stopped:
            reason = "stop"
            cache = self.gen.remove([r.uid], return_prompt_caches=True).get(r.uid)
        if reason is not None:
            tail, reason = a.out.finish(reason)
            out += tail
        events.extend(e.wire() for e in out)
        if reason is not None:
            self._forget(r.uid)
            self._store(cache)
            events.append(self._done(a, reason))
        return events

    # -- helpers --------------------------------------------------------------------------

    def _forget(self, uid: int) -> Active:
        a = self.active.pop(uid)
        self.uid_of.pop(a.id, None)
        self.decoding.discard(uid)
        return a

    def _store(self, cache_and_tokens) -> None:
        if self.prefix_cache is None or not cache_and_tokens:
            return
        cache, tokens = cache_and_tokens
        if cache and tokens:
            self.prefix_cache.store(list(tokens), cache)

    def _logprob(self, a: Active, r) -> Logprob:
        lp, top = r.logprobs, []
        if a.top_logprobs:
            ids = mx.argpartition(-lp, a.top_logprobs - 1)[: a.top_logprobs]
            top = sorted(zip(ids.tolist(), lp[ids].tolist()), key=lambda x: -x[1])
        piece = self.tokenizer.decode
        return Logprob(a.id, piece([r.token]), lp[r.token].item(), [[piece([t]), v] for t, v in top])

    def _done(self, a: Active, reason: str) -> dict:
        now = time.perf_counter()
        start = a.t_prefill_start or now
        return Done(
            a.id, reason, cache_tier=a.cache_tier, itl=a.itl, stop_sequence=a.out.text.matched,
            usage={"prompt_tokens": a.prompt_tokens, "completion_tokens": a.generated,
                   "cached_tokens": a.cached_tokens},
            timings={"queue": start - a.t_submit,
                     "prefill": (a.t_first or now) - start,
                     "ttft": (a.t_first or now) - a.t_submit,
                     "total": now - a.t_submit}).wire()
