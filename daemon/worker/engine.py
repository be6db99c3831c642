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
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from mlx_lm.generate import BatchGenerator

from .sampling import make_sampler
from .textstream import TextStream

log = logging.getLogger("mlxd.worker")


class RequestError(Exception):
    """A request the worker refuses; `code` becomes the OpenAI error code."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def internal_error(rid: Optional[str], e: BaseException) -> dict:
    """The `error` frame for a failure of ours inside one request: a 500 the client can report."""
    return {"op": "error", "id": rid, "status": 500, "code": "internal_error", "param": None,
            "message": f"internal error while serving this request ({type(e).__name__}: {e}); "
                       f"the model keeps serving"}


@dataclass
class Active:
    id: str
    uid: Optional[int]          # None until it joins the batch
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
    cache_key: Optional[str] = None
    itl: list = field(default_factory=list)


@dataclass
class Parked:
    """A request not in the batch yet: its cached prefix is being read from disk."""
    active: Active
    tokens: list[int]
    sampler: Any
    read: Any = None            # the prefix cache's Future for the read


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
        self.max_batch_size, self.prefill_batch_size, self.prefill_step_size = \
            max_batch_size, prefill_batch_size, prefill_step_size
        self.gen = self._new_generator()
        self.active: dict[int, Active] = {}
        self.uid_of: dict[str, int] = {}
        self.decoding: set[int] = set()
        self.parked: dict[str, Parked] = {}    # waiting for their cached prefix to be read from disk
        self.wake = lambda: None               # called (from another thread) when a parked request can start
        self.internal_errors = 0
        self.batch_resets = 0

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            max_tokens=self.default_max_tokens,
            stop_tokens=[[t] for t in sorted(self.eos)],
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=min(self.prefill_batch_size, self.max_batch_size),
            prefill_step_size=self.prefill_step_size,
        )

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
        """Queue a request; returns its `started` event (usage known up front), or None while
        its cached prefix is read from disk (it starts at a later step, see `step`)."""
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
        sampler = make_sampler(float(msg.get("temperature", 0.0)), float(msg.get("top_p", 1.0)), msg.get("seed"))
        a = Active(id=rid, uid=None, prompt_tokens=len(tokens), cached_tokens=0, max_tokens=max_tokens,
                   text=TextStream(self.tokenizer.detokenizer, list(msg.get("stop") or [])),
                   t_submit=time.perf_counter())
        return self._start(Parked(a, tokens, sampler))

    def _start(self, p: "Parked") -> Optional[dict]:
        """Insert a request into the batch on top of its cached prefix; park it (None) while
        that prefix is read from disk, so the engine keeps stepping everyone else."""
        cache, n_cached, tier = None, 0, None
        if self.prefix_cache is not None:
            got = self.prefix_cache.fetch_nowait(p.tokens)
            if isinstance(got, Future):
                p.read = got
                self.parked[p.active.id] = p
                got.add_done_callback(lambda _: self.wake())
                return None
            cache, n_cached, tier = got
        a, tokens = p.active, p.tokens
        a.cache_key = self.prefix_cache.last_key if tier else None
        try:
            (uid,) = self.gen.insert(
                [tokens[n_cached:]], max_tokens=[a.max_tokens], caches=[cache],
                all_tokens=[list(tokens[:n_cached])], samplers=[p.sampler])
        except Exception:
            if a.cache_key:
                self.prefix_cache.discard(a.cache_key)     # not trusted again
            raise
        a.uid, a.cached_tokens, a.cache_tier = uid, n_cached, tier
        self.active[uid] = a
        self.uid_of[a.id] = uid
        return {"op": "started", "id": a.id, "prompt_tokens": len(tokens), "cached_tokens": n_cached}

    def cancel(self, rid: str) -> Optional[dict]:
        if (p := self.parked.pop(rid, None)) is not None:
            self._abandon(p.read)
            return self._done(p.active, "cancelled")
        uid = self.uid_of.get(rid)
        if uid is None:
            return None
        caches = self.gen.remove([uid], return_prompt_caches=True)
        a = self._forget(uid)
        self._store(caches.get(uid))
        return self._done(a, "cancelled")

    @property
    def busy(self) -> bool:
        """Work to do now: sequences in the batch, or parked ones whose disk read is done."""
        return bool(self.active) or any(p.read.done() for p in self.parked.values())

    @property
    def running(self) -> int:
        return len(self.decoding)

    @property
    def waiting(self) -> int:
        return len(self.active) - len(self.decoding) + len(self.parked)

    # -- the step loop ------------------------------------------------------------------

    def step(self) -> list[dict]:
        """One engine step: parked requests whose prefix is read join the batch, then a prefill
        chunk and/or one decoded token for every sequence. A failure fails only the requests it
        touched (the whole batch when the batch itself fails) and the engine goes on."""
        events = self._unpark()
        if not self.active:
            return events
        t0 = time.perf_counter()
        try:
            prompt_resps, gen_resps = self.gen.next()
        except Exception as e:
            return events + self.reset(e)
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
            try:
                events += self._token(a, r, now)
            except Exception as e:
                log.exception("request %s failed while handling its token", a.id)
                if r.uid in self.active:
                    self._forget(r.uid)
                try:
                    self.gen.remove([r.uid])
                except Exception:
                    pass            # it may have left the batch already (finished)
                events.append(self._internal_error(a.id, e))
        return events

    def _token(self, a: "Active", r, now: float) -> list[dict]:
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
            return [{"op": "delta", "id": a.id, "text": delta}] if delta else []
        delta += a.text.finish()
        events = [{"op": "delta", "id": a.id, "text": delta}] if delta else []
        self._forget(r.uid)
        self._store(cache)
        return events + [self._done(a, reason)]

    def _unpark(self) -> list[dict]:
        events = []
        for rid, p in list(self.parked.items()):
            if not p.read.done():
                continue
            del self.parked[rid]
            read = p.read
            try:
                if (ev := self._start(p)) is not None:
                    events.append(ev)
            except Exception as e:
                log.exception("request %s failed to start", rid)
                events.append(self._internal_error(rid, e))
            self._abandon(read)       # a no-op when used; else (another entry won meanwhile) frees what it read
        return events

    def _abandon(self, read) -> None:
        if self.prefix_cache is not None and not any(o.read is read for o in self.parked.values()):
            self.prefix_cache.abandon(read)

    def reset(self, e: Exception) -> list[dict]:
        """The batch failed as a whole: fail its requests, start a fresh generator, and drop the
        cache entries they started from (one of them may be what broke it)."""
        log.error("engine step failed (%s: %s); failing the %d requests in the batch and resetting it",
                  type(e).__name__, e, len(self.active), exc_info=e)
        self.batch_resets += 1
        events = []
        for uid in list(self.active):
            a = self._forget(uid)
            if a.cache_key and self.prefix_cache is not None:
                try:
                    self.prefix_cache.discard(a.cache_key)
                except Exception:
                    log.exception("dropping prefix cache entry %s failed", a.cache_key)
            events.append(self._internal_error(a.id, e))
        self.gen.close()
        self.gen = self._new_generator()
        return events

    def _internal_error(self, rid: str, e: Exception) -> dict:
        self.internal_errors += 1
        return internal_error(rid, e)

    # -- helpers --------------------------------------------------------------------------

    def _forget(self, uid: int) -> Active:
        a = self.active.pop(uid)
        self.uid_of.pop(a.id, None)
        self.decoding.discard(uid)
        return a

    def _store(self, cache_and_tokens) -> None:
        """Best effort: the request's answer is complete, so a failure here costs only reuse."""
        if self.prefix_cache is None or not cache_and_tokens:
            return
        cache, tokens = cache_and_tokens
        if cache and tokens:
            try:
                self.prefix_cache.store(list(tokens), cache)
            except Exception:
                self.prefix_cache.counters["store_errors"] += 1
                log.exception("storing a finished request's cache failed; serving goes on")

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
