"""The last requests the daemon served, in a bounded ring, for the web console.

Fed by wrapping a worker's event stream (`track`), so in-flight requests show their
prefill progress and finished ones keep what the worker measured. Nothing here reaches
Prometheus: the ring is for a person looking, the histograms are for alerts.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Optional

from .process import RequestTimeout, WorkerGone

RATE_WINDOW = 5.0      # seconds of output behind a model's "tokens/s now"
# The worker sends no per-token event: a token that produced output yields one of these (a
# token held back, e.g. inside a stop string or a marker, yields none until it is released),
# so counting them is a close lower bound; a `logprob` event is exact (one per token) when asked.
OUTPUT = ("text", "reasoning", "tool_args")


@dataclass
class Record:
    id: int
    model: str
    surface: str
    time: float                       # wall clock at submit
    prompt_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    generated: int = 0                # tokens so far (output events while in flight; exact once done)
    progress: Optional[list] = None   # [done, total] prompt tokens while prefilling
    ttft: Optional[float] = None
    tokens_per_s: Optional[float] = None
    finish_reason: Optional[str] = None
    cache: Optional[dict] = None      # the prefix cache's outcome (tokens, tier, entry, shared, reason, detail)
    status: str = "running"           # running, ok, error, cancelled
    error: Optional[str] = None


def surface_of(payload: dict) -> str:
    """The API a request came in through; an explicit `surface` wins for routes added later."""
    return payload.get("surface") or ("chat.completions" if "messages" in payload else "completions")


@dataclass
class RecentRequests:
    size: int = 100
    done: deque = field(default_factory=deque)
    live: dict = field(default_factory=dict)
    _deltas: dict = field(default_factory=dict)     # model -> deque of delta times
    _ids: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.done = deque(maxlen=self.size)

    async def track(self, model: str, payload: dict, events: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """Pass a worker's events through unchanged, noting what the console shows."""
        rec = Record(id=next(self._ids), model=model, surface=surface_of(payload), time=time.time())
        self.live[rec.id] = rec
        deltas = self._deltas.setdefault(model, deque())
        exact = False                     # logprob events seen: one per token, count those
        try:
            async with contextlib.aclosing(events):
                async for ev in events:
                    op = ev["op"]
                    if op == "started":
                        rec.prompt_tokens, rec.cached_tokens = ev["prompt_tokens"], ev["cached_tokens"]
                    elif op == "progress":
                        rec.progress = [ev["done"], ev["total"]]
                    elif op == "logprob" or (op in OUTPUT and not exact):
                        if op == "logprob" and not exact:
                            exact, rec.generated = True, 0
                        rec.progress = None
                        rec.generated += 1
                        now = time.monotonic()
                        deltas.append(now)
                        while deltas[0] < now - RATE_WINDOW:
                            deltas.popleft()
                    elif op == "done":
                        self._finish(rec, ev)
                    elif op == "error":
                        rec.status, rec.error = "error", ev.get("message")
                    yield ev
        except (WorkerGone, RequestTimeout) as e:
            rec.status, rec.error = "error", str(e) or type(e).__name__
            raise
        finally:
            if rec.status == "running":
                rec.status = "cancelled"
            rec.progress = None
            self.live.pop(rec.id, None)
            self.done.append(rec)

    @staticmethod
    def _finish(rec: Record, ev: dict) -> None:
        u, t = ev["usage"], ev["timings"]
        rec.prompt_tokens, rec.cached_tokens = u["prompt_tokens"], u["cached_tokens"]
        rec.generated, rec.finish_reason = u["completion_tokens"], ev["finish_reason"]
        rec.ttft = round(t["ttft"], 4)
        rec.cache = ev.get("cache")
        decode = t["total"] - t["ttft"]
        if rec.generated > 1 and decode > 0:
            rec.tokens_per_s = round((rec.generated - 1) / decode, 2)
        rec.status = "cancelled" if ev["finish_reason"] == "cancelled" else "ok"

    def tokens_per_s(self, model: str) -> float:
        """Tokens generated per second by `model` over the last few seconds."""
        deltas = self._deltas.get(model)
        if not deltas:
            return 0.0
        cutoff = time.monotonic() - RATE_WINDOW
        while deltas and deltas[0] < cutoff:
            deltas.popleft()
        return round(len(deltas) / RATE_WINDOW, 1)

    def records(self) -> list[dict]:
        """Newest first: in-flight requests, then finished ones."""
        live = sorted(self.live.values(), key=lambda r: r.id, reverse=True)
        return [asdict(r) for r in (*live, *reversed(self.done))]
