"""Continuous batching for one model: mlx-lm's BatchGenerator plus the prefix cache.

Requests join the running batch at every step and leave it when they finish; each carries
its own sampler, max_tokens and stop strings, so nothing forces the batch to drain. A new
request starts from the longest cached prefix of its prompt and prefills only the rest;
a finished one gives its KV cache (prompt + completion) back to the prefix cache, so the
next turn of the same conversation hits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from mlx_lm.generate import BatchGenerator

from .grammar import Compiler, GrammarError, GrammarProcessor, reasoning_end, request_grammar
from .sampling import make_sampler
from .textstream import TextStream

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
    text: TextStream
    t_submit: float
    t_first: Optional[float] = None
    t_prefill_start: Optional[float] = None
    t_last: Optional[float] = None
    generated: int = 0
    cache_tier: Optional[str] = None
    itl: list = field(default_factory=list)
    grammar: Optional[GrammarProcessor] = None


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int, prefill_batch_size: int,
                 prefill_step_size: int, context_length: int, default_max_tokens: int,
                 prefix_cache: Any = None):
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
        # Constrained requests wait here while their grammar compiles on the compiler's thread;
        # `wake` (set by the worker loop) is called when one is ready.
        self.pending: dict[str, tuple] = {}
        self.compiler: Optional[Compiler] = None
        self.wake = lambda: None

    # -- requests ---------------------------------------------------------------------

    def tokenize(self, msg: dict) -> list[int]:
        if "messages" in msg:
            try:
                tokens = self.tokenizer.apply_chat_template(
                    msg["messages"], add_generation_prompt=True, tokenize=True)
            except Exception as e:  # jinja raises for roles/contents a template rejects
                raise RequestError(f"chat template rejected the messages: {e}", param="messages") from None
            return list(tokens)
        prompt = msg.get("prompt", "")
        if isinstance(prompt, list):
            vocab = getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer)
            bad = next((t for t in prompt if not 0 <= int(t) < vocab), None)
            if bad is not None:
                raise RequestError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
            return [int(t) for t in prompt]
        return list(self.tokenizer.encode(prompt))

    def submit(self, msg: dict) -> Optional[dict]:
        """Queue a request; returns its `started` event (usage known up front), or None
        while its grammar compiles (`step` sends it then)."""
        rid = msg["id"]
        tokens = self.tokenize(msg)
        if not tokens:
            raise RequestError("the prompt is empty", param="prompt")
        max_tokens = int(msg.get("max_tokens") or self.default_max_tokens)
        if len(tokens) + max_tokens > self.context_length:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {len(tokens) + max_tokens} tokens ({len(tokens)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                code="context_length_exceeded", param="max_tokens")
        try:
            wanted = request_grammar(msg)
        except GrammarError as e:
            raise RequestError(str(e), param=e.param) from None
        if wanted is not None:
            if self.compiler is None:
                self.compiler = Compiler(self.tokenizer, self._vocab_size())
            fut = self.compiler.compile(*wanted)
            self.pending[rid] = (fut, msg, tokens, time.perf_counter())
            fut.add_done_callback(lambda _: self.wake())
            return None
        return self._start(rid, msg, tokens, time.perf_counter())

    def _start(self, rid: str, msg: dict, tokens: list[int], t_submit: float, matcher=None) -> dict:
        cache, n_cached, tier = (None, 0, None)
        if self.prefix_cache is not None:
            cache, n_cached, tier = self.prefix_cache.fetch(tokens)
        sampler = make_sampler(float(msg.get("temperature", 0.0)), float(msg.get("top_p", 1.0)), msg.get("seed"))
        max_tokens = int(msg.get("max_tokens") or self.default_max_tokens)
        proc = None if matcher is None else GrammarProcessor(
            matcher, self._vocab_size(), self.tokenizer.eos_token_id, reasoning_end(self.tokenizer, tokens))
        (uid,) = self.gen.insert(
            [tokens[n_cached:]], max_tokens=[max_tokens], caches=[cache],
            all_tokens=[list(tokens[:n_cached])], samplers=[sampler],
            logits_processors=None if proc is None else [[proc]])
        self.active[uid] = Active(
            id=rid, uid=uid, prompt_tokens=len(tokens), cached_tokens=n_cached, max_tokens=max_tokens,
            text=TextStream(self.tokenizer.detokenizer, list(msg.get("stop") or [])),
            t_submit=t_submit, cache_tier=tier, grammar=proc)
        self.uid_of[rid] = uid
        return {"op": "started", "id": rid, "prompt_tokens": len(tokens), "cached_tokens": n_cached}

    def cancel(self, rid: str) -> Optional[dict]:
        if rid in self.pending:
            fut, _, tokens, t_submit = self.pending.pop(rid)
            fut.cancel()
            return self._done(Active(id=rid, uid=-1, prompt_tokens=len(tokens), cached_tokens=0, max_tokens=0,
                                     text=None, t_submit=t_submit), "cancelled")
        uid = self.uid_of.get(rid)
        if uid is None:
            return None
        caches = self.gen.remove([uid], return_prompt_caches=True)
        a = self._forget(uid)
        self._store(caches.get(uid))
        return self._done(a, "cancelled")

    @property
    def busy(self) -> bool:
        return bool(self.active) or any(p[0].done() for p in self.pending.values())

    @property
    def running(self) -> int:
        return len(self.decoding)

    @property
    def waiting(self) -> int:
        return len(self.active) - len(self.decoding) + len(self.pending)

    # -- the step loop ------------------------------------------------------------------

    def step(self) -> list[dict]:
        """One engine step: a prefill chunk and/or one decoded token for every sequence."""
        events: list[dict] = self._admit_compiled()
        if not self.active:
            return events
        t0 = time.perf_counter()
        prompt_resps, gen_resps = self.gen.next()
        now = time.perf_counter()
        for p in prompt_resps:
            a = self.active.get(p.uid)
            if a is None:
                continue
            if a.t_prefill_start is None:
                a.t_prefill_start = t0
            if p.end_of_prompt:
                self.decoding.add(p.uid)
            else:
                events.append({"op": "progress", "id": a.id, "done": p.progress[0], "total": p.progress[1]})
        for r in gen_resps:
            a = self.active.get(r.uid)
            if a is None:
                continue
            if a.grammar is not None and a.grammar.error:
                if r.finish_reason is None:
                    self.gen.remove([r.uid])
                self._forget(r.uid)
                events.append({"op": "error", "id": a.id, "message": a.grammar.error, "code": "grammar_error",
                               "param": None, "status": 500})
                continue
            a.generated += 1
            if a.t_first is None:
                a.t_first = now
            else:
                a.itl.append(round(now - a.t_last, 5))
            a.t_last = now
            reason = r.finish_reason
            delta = "" if (reason == "stop" and r.token in self.eos) else a.text.add(r.token)
            cache = (r.prompt_cache, r.all_tokens) if reason else None
            if reason is None and a.text.stopped:
                reason = "stop"
                cache = self.gen.remove([r.uid], return_prompt_caches=True).get(r.uid)
            if reason is None:
                if delta:
                    events.append({"op": "delta", "id": a.id, "text": delta})
                continue
            delta += a.text.finish()
            if delta:
                events.append({"op": "delta", "id": a.id, "text": delta})
            self._forget(r.uid)
            self._store(cache)
            events.append(self._done(a, reason))
        return events

    # -- helpers --------------------------------------------------------------------------

    def _vocab_size(self) -> int:
        return getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer)

    def _admit_compiled(self) -> list[dict]:
        """Start the requests whose grammar is compiled; fail those whose grammar is not."""
        events = []
        for rid, (fut, msg, tokens, t_submit) in list(self.pending.items()):
            if not fut.done():
                continue
            del self.pending[rid]
            try:
                events.append(self._start(rid, msg, tokens, t_submit, fut.result()))
            except GrammarError as e:
                events.append({"op": "error", "id": rid, "message": str(e), "code": "invalid_request_error",
                               "param": e.param, "status": 400})
            except Exception as e:
                log.exception("compiling the grammar of %s failed", rid)
                events.append({"op": "error", "id": rid, "message": f"constrained decoding is unavailable: {e}",
                               "code": "grammar_unavailable", "param": None, "status": 500})
        return events

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

    def _done(self, a: Active, reason: str) -> dict:
        now = time.perf_counter()
        start = a.t_prefill_start or now
        return {
            "op": "done", "id": a.id, "finish_reason": reason, "cache_tier": a.cache_tier, "itl": a.itl,
            "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.generated,
                      "cached_tokens": a.cached_tokens},
            "timings": {"queue": start - a.t_submit,
                        "prefill": (a.t_first or now) - start,
                        "ttft": (a.t_first or now) - a.t_submit,
                        "total": now - a.t_submit},
        }
