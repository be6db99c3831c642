"""One model's worker as a state machine with a single owner task.

    stopped ──start──▶ loading ──worker ready──▶ ready ──worker exits──▶ restarting ──backoff──▶ loading
    restarting ──too many quick crashes──▶ failed (until the config changes)
    ready ──drain──▶ draining (in-flight requests finish) ──▶ stopping
    loading, ready, restarting ──stop──▶ stopping ──worker gone──▶ stopped

    any state ──a bug in the lifecycle itself──▶ failed

Only the owner task (`_run`) starts, stops or kills the worker and changes the state (through
`_transition`); everyone else asks the handle: `generate` and `call` reach a ready worker,
`request_stop()` / `stop()` ask the owner to end and wait for it (so there is never a second
run loop), the stats poller reports a hang to the owner rather than killing. The one
exception is `kill_now()`, for a second stop signal when the daemon exits at once. A
request that finds the handle stopping waits for `stopped` and loads it again through the
supervisor's single-flight loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Optional

from ..config import ModelConfig, Server
from ..metrics import Metrics, worker_counter_values
from ..process import RequestTimeout, WorkerGone
from .port import Spawn, Worker, spawn_process

log = logging.getLogger("mlxd.lifecycle")

BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_QUICK_CRASHES = 5      # crashes within QUICK seconds of becoming ready
QUICK = 60.0
STATS_INTERVAL = 2.0

TRANSITIONS = {
    "stopped": {"loading"},
    "loading": {"ready", "restarting", "stopping"},
    "ready": {"restarting", "draining", "stopping"},
    "restarting": {"loading", "failed", "stopping"},
    "draining": {"stopping"},
    "stopping": {"stopped"},
    "failed": set(),
}


class ModelUnavailable(Exception):
    pass


class ModelAtCapacity(Exception):
    pass


class InvalidTransition(RuntimeError):
    pass


class ModelHandle:
    def __init__(self, cfg: ModelConfig, server: Callable[[], Server], metrics: Metrics,
                 spawn: Spawn = spawn_process):
        self.cfg = cfg
        self._spawn = spawn                 # the worker seam (port.py): a process, or a test's double
        self._server = server               # the live settings: a reload applies to existing handles too
        self.metrics = metrics
        metrics.model_added(cfg.name)
        self.stats: dict = {}
        self._counter_base = dict.fromkeys(worker_counter_values({}), 0)
        self.state = "stopped"
        self._changed = asyncio.Event()     # set (and replaced) at every transition
        self._stop_wanted = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._worker: Optional[Worker] = None      # only the owner task assigns, stops or kills it
        self.retired = False                # removed or replaced: never loads again
        self.parked = False                 # stopped by the daemon (idle, budget); loads at the next request
        self.restarts = 0
        self.quick_crashes = 0
        self.last_error = ""
        self.last_used: Optional[float] = None
        self.started_at: Optional[float] = None
        self.started_wall = 0.0
        self.start_seconds: Optional[float] = None   # last spawn-to-ready, what a load on demand costs
        self.starts = 0                     # worker processes spawned
        self.memory_estimate = 0            # largest memory seen, to plan the next load
        self.tokens = {"prompt": 0, "generated": 0}
        self.requests = 0                   # admitted and not finished, waiting for a load included
        self.on_demand = None               # the supervisor's loader, for models not preloaded
        self.on_ready = None                # the supervisor's budget check, once memory is known
        self.pin_override = None            # (cfg, pinned) set at runtime; holds while cfg is current
        self._served: Optional[str] = None  # what the last ready worker served, kept while parked
        self.ttl_override = None            # (cfg, idle_ttl) from a request's keep_alive; holds while cfg is current

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def pinned(self) -> bool:
        """A runtime pin or unpin (console, POST /v1/models/{name}/pin) lasts until this model's entry changes."""
        over = self.pin_override
        return over[1] if over is not None and over[0] is self.cfg else self.cfg.pinned

    @property
    def idle_ttl(self) -> Optional[float]:
        """The config's idle_ttl, or the last keep_alive a request set (until this model's entry changes)."""
        over = self.ttl_override
        return over[1] if over is not None and over[0] is self.cfg else self.cfg.idle_ttl

    @property
    def server(self) -> Server:
        return self._server()

    @property
    def running(self) -> bool:
        """Holds (or is about to hold) a worker that is not being stopped."""
        return self.state in ("loading", "ready", "restarting", "draining")

    @property
    def busy(self) -> bool:
        return bool(self.requests or self.in_flight)

    @property
    def in_flight(self) -> int:
        """Requests its worker is serving now."""
        return self._worker.in_flight if self._worker is not None else 0

    @property
    def pid(self) -> Optional[int]:
        """The ready worker's process id."""
        return self._worker.pid if self._worker is not None and self.state == "ready" else None

    @property
    def worker_info(self) -> dict:
        """What the last worker said when it became ready (device, dtype, BLAS, ...)."""
        return {k: v for k, v in (self._worker.info if self._worker else {}).items() if k != "op"}

    @property
    def serves(self) -> Optional[str]:
        """"chat" or "embedding": the entry's `kind`, else what its last worker found; None before a load."""
        if self.cfg.kind is not None:
            return self.cfg.kind
        return (self._worker.info.get("serves") if self._worker is not None else None) or self._served

    def _transition(self, to: str, broken: bool = False) -> None:
        """The only writer of `state`; `broken`: a bug in the lifecycle, failed from anywhere."""
        if to not in TRANSITIONS[self.state] and not (broken and to == "failed"):
            raise InvalidTransition(f"model {self.name!r}: {self.state} -> {to} is not allowed")
        log.debug("model %s: %s -> %s", self.name, self.state, to)
        self.state = to
        self._changed.set()
        self._changed = asyncio.Event()

    async def _state_change(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def settled(self) -> str:
        """Once started, the state it comes to rest in: ready, failed or stopped; at once if retired.

        A handle not started yet is waited for: its load may first wait for room under the budget.
        """
        while not self.retired and (self.state not in ("ready", "failed", "stopped") or self._task is None):
            await self._changed.wait()
        return self.state

    def retire(self) -> None:
        """Removed or replaced: never loads again; whoever waits on it hears of it now."""
        self.retired = True
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the owner task ---------------------------------------------------------------

    def start(self) -> bool:
        """Launch the owner task; only from stopped (a stopping handle finishes first)."""
        if self.state != "stopped" or self.retired:
            return False
        self._stop_wanted = asyncio.Event()
        self._transition("loading")
        self._task = asyncio.create_task(self._run(), name=f"model-{self.name}")
        return True

    async def _run(self) -> None:
        try:
            await self._loop()
            if self.state == "failed":
                return
            if self.state != "stopping":       # a draining worker that died: nothing to restart
                self._transition("stopping")
            self._transition("stopped")
        except Exception as e:   # a bug, not a worker failure: still end in a known state
            log.exception("model %s: lifecycle task failed", self.name)
            self.metrics.internal_error("handle")
            self.last_error = f"internal error: {e!r}"
            if self._worker is not None:
                await self._worker.kill()
            self._transition("failed", broken=True)

    async def _until(self, *futs) -> bool:
        """Wait for any of `futs` or a stop request; False if the stop came first."""
        stop = asyncio.ensure_future(self._stop_wanted.wait())
        try:
            await asyncio.wait([*futs, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return not self._stop_wanted.is_set()

    async def _loop(self) -> None:
        attempt = 0
        while True:
            if self.state == "restarting":
                self._transition("loading")
            self.starts += 1
            worker = self._spawn(self.cfg, self.server.resolved_cache_dir, self.server)
            self._worker = worker
            spawned = time.monotonic()
            starting = asyncio.ensure_future(worker.start(self.server.worker_start_timeout))
            if not await self._until(starting):     # stopped while loading: nothing to flush yet
                while worker.proc is None and not starting.done():
                    await asyncio.sleep(0.01)
                await worker.kill()
                await asyncio.gather(starting, return_exceptions=True)
                return
            try:
                info = starting.result()
            except WorkerGone as e:
                self.last_error = str(e)
                log.error("%s", e)
            else:
                log.info("model %s ready (pid %s, %s, %s, BLAS %s, context %s tokens, loaded in %.1fs)", self.name,
                         info["pid"], info["device"], info["dtype"], info["blas"], info.get("context_length"),
                         info["load_seconds"])
                self.started_at, self.started_wall = time.monotonic(), time.time()
                self.start_seconds = self.started_at - spawned
                self.metrics.worker_start.labels(self.name).observe(self.start_seconds)
                self.memory_estimate = max(self.memory_estimate, info.get("mlx_memory_bytes", 0))
                self._served = info.get("serves")
                self.parked = False
                self._transition("ready")
                if self.on_ready is not None:
                    self.on_ready(self)
                poller = asyncio.create_task(self._poll_stats(worker), name=f"stats-{self.name}")
                exited = await self._until(worker.exited, poller)
                poller.cancel()
                if exited and not worker.exited.done() and not poller.cancelled() \
                        and (hung := poller.result()):
                    await worker.kill(hung)         # the poller saw a hang: the owner kills
                if not exited:                      # asked to stop: let the worker flush its cache
                    await worker.stop(self.server.worker_stop_timeout)
                    self._fold_counters()
                    return
                self._fold_counters()
                if self.state == "draining":
                    return
                self.last_error = worker.exit_reason
                log.error("%s; restarting it", worker.exit_reason)
                if time.monotonic() - self.started_at > QUICK:
                    attempt, self.quick_crashes = 0, 0
            self.restarts += 1
            self.metrics.restarts.labels(self.name).inc()
            self._transition("restarting")
            self.quick_crashes += 1
            if self.quick_crashes >= MAX_QUICK_CRASHES:
                log.error("model %s failed %d times in a row; giving up until the config changes",
                          self.name, self.quick_crashes)
                self._transition("failed")
                return
            pause = asyncio.ensure_future(asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)]))
            if not await self._until(pause):
                pause.cancel()
                return
            attempt += 1

    def request_stop(self) -> Optional[asyncio.Task]:
        """Tell the owner task to end, at once and without awaiting; returns the task to wait on."""
        task = self._task
        if task is None or task.done():
            return None
        if not self._stop_wanted.is_set():
            self._stop_wanted.set()
            self._transition("stopping")
        return task

    async def stop(self) -> None:
        """Stop the worker (it flushes its cache) and wait until it is gone; safe to call repeatedly."""
        task = self.request_stop()
        if task is not None:
            await asyncio.shield(task)

    async def unload(self, timeout: float) -> None:
        """Park it: in-flight requests get `timeout` to finish, then the worker stops; the next
        request loads it again (unlike `drain`, which retires the handle for good)."""
        self.parked = True
        deadline = time.monotonic() + timeout
        while self.state == "ready" and self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def drain(self, timeout: float) -> None:
        """Retire the handle: no new requests; in-flight ones get `timeout` to finish, then stop."""
        self.retire()
        if self.state == "ready":
            self._transition("draining")
            log.info("model %s draining: waiting up to %.0fs for %d in flight", self.name, timeout, self.in_flight)
            deadline = time.monotonic() + timeout
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.in_flight:
                log.warning("model %s: drain deadline reached; cancelling %d request(s)", self.name, self.in_flight)
        await self.stop()

    async def _poll_stats(self, worker: Worker) -> Optional[str]:
        """Keep a fresh stats snapshot for /metrics and /v1/status; returns why the worker is
        hung when it is (the owner task kills it), None when it exited.

        Nothing unexpected may end this loop: hang detection lives in it.
        """
        while not worker.exited.done():
            try:
                stats = await worker.call("stats", timeout=STATS_INTERVAL * 5)
                if not isinstance(stats, dict):
                    raise TypeError(f"stats reply is a {type(stats).__name__}, not an object")
                self.stats = stats
                self.memory_estimate = max(self.memory_estimate, stats.get("memory_bytes", 0))
            except (WorkerGone, asyncio.TimeoutError):
                pass
            except Exception:
                log.exception("model %s: polling the worker's stats failed", self.name)
                self.metrics.internal_error("poll_stats")
            silent = time.monotonic() - worker.last_frame
            if silent > self.server.worker_hang_timeout and not worker.exited.done():
                log.error("worker for model %s (pid %s) made no progress for %.0fs: killing it",
                          self.name, worker.pid, silent)
                return f"the worker for model {self.name!r} hung (no progress for {silent:.0f}s) and was restarted"
            await asyncio.sleep(STATS_INTERVAL)
        return None

    def _fold_counters(self) -> None:
        """A dead worker's counters join the base, so the exposed totals never go back."""
        for k, v in worker_counter_values(self.stats).items():
            self._counter_base[k] += v
        self.stats = {}

    def counters(self) -> dict:
        """This model's worker counters since the daemon started, across worker restarts."""
        live = worker_counter_values(self.stats)
        return {k: self._counter_base[k] + live[k] for k in self._counter_base}

    def spec_counters(self) -> Optional[dict]:
        """Speculative decoding's draft and accepted tokens over every worker, or None when it is off."""
        if self.cfg.engine.speculative is None:
            return None
        totals = self.counters()
        return {"draft_tokens": totals["spec_draft_tokens"], "accepted_tokens": totals["spec_accepted_tokens"]}

    # -- requests ---------------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> Worker:
        """The ready worker, loading it on demand; fails at once when it cannot come."""
        deadline = time.monotonic() + timeout
        while self.state != "ready":
            if self.retired:
                raise ModelUnavailable(f"model {self.name!r} was removed or replaced while this request "
                                       f"waited; retry")
            if self.state == "failed":
                raise ModelUnavailable(f"model {self.name!r} failed to start: {self.last_error}")
            if self.state == "stopped":
                if self.on_demand is None:
                    raise ModelUnavailable(f"model {self.name!r} is not ready (stopped)")
                await self.on_demand(self)
                if self.state == "stopped" and not self.retired:
                    raise ModelUnavailable(f"model {self.name!r} could not be started")
                continue
            # loading, restarting, stopping (then load again), draining (then retired)
            if not await self._state_change(deadline - time.monotonic()):
                raise ModelUnavailable(f"model {self.name!r} is not ready ({self.state})")
        return self._worker

    async def call(self, op: str, timeout: float = 30.0, load: bool = False, admit: bool = False,
                   **fields) -> dict:
        """One request/reply operation on the ready worker (stats, cache_clear, count_tokens).
        With `load`, a stopped model loads first; else ModelUnavailable unless it is ready.
        With `admit`, it takes a request slot like `generate` (429 past the same limit): a
        count_tokens renders and tokenizes on the worker as a generation does."""
        if admit:
            self._take_slot()
        try:
            if load:
                worker = await self.wait_ready(self.server.worker_start_timeout)
            elif self.state != "ready" or self._worker is None:
                raise ModelUnavailable(f"model {self.name!r} is not ready ({self.state})")
            else:
                worker = self._worker
            return await worker.call(op, timeout=timeout, **fields)
        finally:
            if admit:
                self.requests -= 1
                self.last_used = time.time()

    def _take_slot(self) -> None:
        """Admission: checked and counted in one step (no await between)."""
        limit = self.cfg.engine.max_batch_size + self.cfg.engine.max_waiting
        if self.requests >= limit:
            self.metrics.request_failed(self.name, "at_capacity")
            raise ModelAtCapacity(f"Model '{self.name}' is at capacity ({self.requests} requests running or "
                                  f"queued, limit {limit}); retry shortly.")
        self.requests += 1

    def kill_now(self) -> None:
        """SIGKILL the worker without waiting: only for a second stop signal, as mlxd exits."""
        if self._worker is not None:
            self._worker.kill_now()

    async def generate(self, payload: dict, timeout: Optional[float] = None) -> AsyncIterator[dict]:
        self._take_slot()
        finished = False
        try:
            worker = await self.wait_ready(self.server.worker_start_timeout)
            self.last_used = time.time()
            # Closed here, not left to its finalizer: closing it is what cancels the worker's request.
            async with contextlib.aclosing(self.metrics.recent.track(self.name, payload,
                                                                     worker.generate(payload, timeout))) as events:
                async for ev in events:
                    if ev["op"] == "done":
                        finished = True
                        self.tokens["prompt"] += ev["usage"]["prompt_tokens"]
                        self.tokens["generated"] += ev["usage"]["completion_tokens"]
                        self.metrics.request_done(self.name, ev, self.cfg.prefix_cache.enabled and self.serves != "embedding")
                    elif ev["op"] == "error":
                        finished = True
                        self.metrics.request_failed(self.name, ev.get("code") or "invalid_request")
                    yield ev
        except WorkerGone:
            finished = True
            self.metrics.request_failed(self.name, "worker_died")
            raise
        except RequestTimeout:
            finished = True
            self.metrics.request_failed(self.name, "timeout")
            raise
        except ModelUnavailable:
            finished = True
            self.metrics.request_failed(self.name, "model_unavailable")
            raise
        finally:
            self.requests -= 1
            self.last_used = time.time()
            if not finished:
                self.metrics.request_failed(self.name, "cancelled")

    def status(self) -> dict:
        w, totals = self._worker, self.counters()
        return {
            "name": self.name, "aliases": list(self.cfg.aliases), "state": self.state, "serves": self.serves,
            "pid": w.pid if w and self.state == "ready" else None,
            "restarts": self.restarts, "last_error": self.last_error or None,
            "requests_in_flight": w.in_flight if w else 0,
            "requests_admitted": self.requests,     # not finished, those waiting for a load included
            "requests_running": self.stats.get("running", 0), "requests_waiting": self.stats.get("waiting", 0),
            "memory_bytes": self.stats.get("memory_bytes", 0), "tokens": dict(self.tokens),
            "cache": _cache_summary(self.stats.get("cache")),
            "internal_errors": totals["internal_errors"], "batch_resets": totals["batch_resets"],
            "speculative": _spec_summary(self.spec_counters()),
            "workers_started": self.starts, "start_seconds": self.start_seconds, "preload": self.cfg.preload, "pinned": self.pinned,
            "last_used": self.last_used,
            "worker": self.worker_info,
            **({"ranks": self.stats["ranks"]} if self.stats.get("ranks") else {}),
        }


def _spec_summary(counters: Optional[dict]) -> Optional[dict]:
    if counters is None:
        return None
    drafted = counters["draft_tokens"]
    return {**counters, "acceptance_rate": round(counters["accepted_tokens"] / drafted, 4) if drafted else None}


def _cache_summary(cache: Optional[dict]) -> Optional[dict]:
    if not cache:
        return None
    return {"entries": cache["entries"], "memory_bytes": cache["memory"]["bytes"],
            "disk_bytes": cache["disk"]["bytes"], "hit_tokens": cache["hit_tokens"],
            "query_tokens": cache["query_tokens"]}
