"""Desired state (the config) vs actual state (one handle per model), and the loop between.

Each `ModelHandle` keeps one worker alive: it starts it, marks the model ready, and when
the worker dies it fails only that worker's requests and starts a new one with backoff.
A worker that keeps dying is marked failed instead of looping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Optional

from .config import Config, ConfigError, ModelConfig, load_config
from .metrics import Metrics, cache_counter_values
from .process import WorkerGone, WorkerProcess

log = logging.getLogger("mlxd.supervisor")

BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_QUICK_CRASHES = 5      # crashes within QUICK seconds of becoming ready
QUICK = 60.0
STATS_INTERVAL = 2.0


class ModelUnavailable(Exception):
    pass


class ModelAtCapacity(Exception):
    pass


class ModelHandle:
    def __init__(self, cfg: ModelConfig, server_cfg, metrics: Metrics):
        self.cfg = cfg
        self.server_cfg = server_cfg
        self.metrics = metrics
        metrics.model_added(cfg.name)
        self.stats: dict = {}
        self._counter_base = dict.fromkeys(cache_counter_values({}), 0)
        self.state = "stopped"
        self.worker: Optional[WorkerProcess] = None
        self.restarts = 0
        self.quick_crashes = 0
        self.last_error = ""
        self.last_used: Optional[float] = None
        self.started_at: Optional[float] = None
        self.started_wall = 0.0
        self.start_seconds: Optional[float] = None   # last spawn-to-ready, what a load on demand costs
        self._ready = asyncio.Event()
        self._stopping = False
        self._task: Optional[asyncio.Task] = None
        self.starts = 0                     # worker processes spawned
        self.memory_estimate = 0            # largest memory seen, to plan the next load
        self.tokens = {"prompt": 0, "generated": 0}
        self.requests = 0                   # admitted and not finished, waiting for a load included
        self.on_demand = None               # the supervisor's loader, for models not preloaded
        self.on_ready = None                # the supervisor's budget check, once memory is known

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def busy(self) -> bool:
        return bool(self.requests or (self.worker and self.worker.in_flight))

    def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self.state = "loading"
        self._task = asyncio.create_task(self._run(), name=f"model-{self.name}")

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            self.state = "loading"
            self.starts += 1
            worker = WorkerProcess(self.cfg, self.server_cfg.resolved_cache_dir, self.server_cfg)
            self.worker = worker
            spawned = time.monotonic()
            try:
                info = await worker.start(self.server_cfg.worker_start_timeout)
            except WorkerGone as e:
                self.last_error = str(e)
                log.error("%s", e)
                if self._stopping:
                    break
                self.restarts += 1
                self.metrics.restarts.labels(self.name).inc()
            else:
                log.info("model %s ready (pid %s, %s, %s, BLAS %s, loaded in %.1fs)", self.name,
                         info["pid"], info["device"], info["dtype"], info["blas"], info["load_seconds"])
                self.state, self.started_at, self.started_wall = "ready", time.monotonic(), time.time()
                self.start_seconds = self.started_at - spawned
                self.metrics.worker_start.labels(self.name).observe(self.start_seconds)
                self.memory_estimate = max(self.memory_estimate, info.get("mlx_memory_bytes", 0))
                if self.on_ready is not None:
                    self.on_ready(self)
                self._ready.set()
                poller = asyncio.create_task(self._poll_stats(worker))
                await worker.exited
                poller.cancel()
                self._ready.clear()
                self._fold_counters()
                if self._stopping:
                    break
                self.last_error = worker.exit_reason
                log.error("%s; restarting it", worker.exit_reason)
                self.restarts += 1
                self.metrics.restarts.labels(self.name).inc()
                if time.monotonic() - self.started_at > QUICK:
                    attempt, self.quick_crashes = 0, 0
            if self._stopping:
                break
            self.quick_crashes += 1
            if self.quick_crashes >= MAX_QUICK_CRASHES:
                self.state = "failed"
                log.error("model %s failed %d times in a row; giving up until the config changes",
                          self.name, self.quick_crashes)
                return
            self.state = "restarting"
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1
        self.state = "stopped"

    async def _poll_stats(self, worker: WorkerProcess) -> None:
        """Keep a fresh stats snapshot for /metrics and /v1/status without asking at scrape time."""
        while not worker.exited.done():
            try:
                self.stats = await worker.call("stats", timeout=STATS_INTERVAL * 5)
                self.memory_estimate = max(self.memory_estimate, self.stats.get("memory_bytes", 0))
            except (WorkerGone, asyncio.TimeoutError):
                silent = time.monotonic() - worker.last_frame
                if silent > self.server_cfg.worker_hang_timeout and not worker.exited.done():
                    log.error("worker for model %s (pid %s) made no progress for %.0fs: killing it",
                              self.name, worker.pid, silent)
                    await worker.kill(f"the worker for model {self.name!r} hung (no progress for {silent:.0f}s) "
                                      f"and was restarted")
                    return
            await asyncio.sleep(STATS_INTERVAL)

    def _fold_counters(self) -> None:
        """A dead worker's cache counters join the base, so the exposed totals never go back."""
        if self.stats.get("cache"):
            for k, v in cache_counter_values(self.stats["cache"]).items():
                self._counter_base[k] += v
        self.stats = {}

    def cache_counters(self) -> dict:
        live = cache_counter_values(self.stats.get("cache") or {})
        return {k: self._counter_base[k] + live[k] for k in self._counter_base}

    async def wait_ready(self, timeout: float) -> WorkerProcess:
        if not self.running and self.state != "failed" and self.on_demand is not None:
            await self.on_demand(self)
        if self.state == "failed":
            raise ModelUnavailable(f"model {self.name!r} failed to start: {self.last_error}")
        if not self._ready.is_set():
            # Ready, or the handle's loop ended (failed, stopped): waiters must not sit out the timeout.
            ready = asyncio.ensure_future(self._ready.wait())
            await asyncio.wait([ready, *([self._task] if self._task else [])], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
        if not self._ready.is_set() or self.worker is None:
            detail = f": {self.last_error}" if self.state == "failed" else ""
            raise ModelUnavailable(f"model {self.name!r} is not ready ({self.state}){detail}")
        return self.worker

    async def generate(self, payload: dict, timeout: Optional[float] = None) -> AsyncIterator[dict]:
        limit = self.cfg.engine.max_batch_size + self.cfg.engine.max_waiting
        if self.requests >= limit:     # checked and counted in one step: no await between
            self.metrics.request_failed(self.name, "at_capacity")
            raise ModelAtCapacity(f"Model '{self.name}' is at capacity ({self.requests} requests running or "
                                  f"queued, limit {limit}); retry shortly.")
        self.requests += 1
        finished = False
        try:
            worker = await self.wait_ready(self.server_cfg.worker_start_timeout)
            self.last_used = time.time()
            async for ev in worker.generate(payload, timeout):
                if ev["op"] == "done":
                    finished = True
                    self.tokens["prompt"] += ev["usage"]["prompt_tokens"]
                    self.tokens["generated"] += ev["usage"]["completion_tokens"]
                    self.metrics.request_done(self.name, ev, self.cfg.prefix_cache.enabled)
                elif ev["op"] == "error":
                    finished = True
                    self.metrics.request_failed(self.name, ev.get("code") or "invalid_request")
                yield ev
        except WorkerGone:
            finished = True
            self.metrics.request_failed(self.name, "worker_died")
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

    async def drain(self, timeout: float) -> None:
        """No new requests reach a draining model; in-flight ones get `timeout` to finish."""
        self.state = "draining"
        deadline = time.monotonic() + timeout
        while self.worker is not None and self.worker.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._ready.clear()
        if self.worker is not None:
            await self.worker.stop(timeout)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self.state = "stopped"

    def status(self) -> dict:
        w = self.worker
        return {
            "name": self.name, "aliases": list(self.cfg.aliases), "state": self.state,
            "pid": w.pid if w and self.state == "ready" else None,
            "restarts": self.restarts, "last_error": self.last_error or None,
            "requests_in_flight": w.in_flight if w else 0,
            "requests_running": self.stats.get("running", 0), "requests_waiting": self.stats.get("waiting", 0),
            "memory_bytes": self.stats.get("memory_bytes", 0), "tokens": dict(self.tokens),
            "cache": _cache_summary(self.stats.get("cache")),
            "workers_started": self.starts, "start_seconds": self.start_seconds, "preload": self.cfg.preload, "pinned": self.cfg.pinned,
            "last_used": self.last_used,
            "worker": {k: v for k, v in (w.info if w else {}).items() if k != "op"},
        }


def _cache_summary(cache: Optional[dict]) -> Optional[dict]:
    if not cache:
        return None
    return {"entries": cache["entries"], "memory_bytes": cache["memory"]["bytes"],
            "disk_bytes": cache["disk"]["bytes"], "hit_tokens": cache["hit_tokens"],
            "query_tokens": cache["query_tokens"]}


class Supervisor:
    """Converges the running models to the config: start, replace, reconfigure, drain, stop.

    A model whose entry did not change is never touched. A changed engine or source gets a
    new worker beside the old one; routing switches only once the new one is ready, then
    the old one drains. Aliases and sampling defaults apply live.
    """

    def __init__(self, config: Config, json_logs: bool = False, config_path: Optional[str] = None):
        self.config = config
        self.metrics = Metrics(self, json_logs=json_logs)
        self.handles: dict[str, ModelHandle] = {}
        self.pending: dict[str, ModelHandle] = {}     # replacements still loading
        self.routes: dict[str, ModelHandle] = {}
        self.started = time.time()
        self.config_path = config_path
        self.generation = 0
        self.loaded_at: Optional[float] = None
        self.last_error: Optional[str] = None
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self.draining = False

    async def start(self) -> None:
        await self.apply(self.config)
        self._spawn(self._reap_idle())

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _new_handle(self, m: ModelConfig, load: bool = False) -> ModelHandle:
        h = ModelHandle(m, self.config.server, self.metrics)
        h.on_demand = self.ensure_loaded
        h.on_ready = lambda h: self._spawn(self._make_room(h))
        if m.preload or load:
            self._spawn(self.ensure_loaded(h))
        return h

    async def ensure_loaded(self, h: ModelHandle) -> None:
        """Start a model's worker once (single-flight), first making room under the memory budget."""
        async with self._load_lock:
            if h.running:
                return
            await self._make_room(h)
            h.start()

    async def _make_room(self, h: ModelHandle) -> None:
        """Stop least-recently-used idle, unpinned models until `h` fits the memory budget.

        Runs before a load (with what `h` used last time, or what a model of the same
        source uses) and again once `h` is ready and its real size is known.
        """
        budget = self.config.server.memory_budget
        if budget is None:
            return
        need = h.memory_estimate or max((x.memory_estimate for x in self.all_handles()
                                          if x.cfg.source == h.cfg.source and x.cfg.dtype == h.cfg.dtype), default=0)
        loaded = [x for x in self.all_handles() if x.running and x is not h]
        used = sum(x.memory_estimate for x in loaded)
        victims = sorted((x for x in loaded if not x.cfg.pinned and not x.busy), key=lambda x: x.last_used or 0)
        while used + need > budget and victims:
            v = victims.pop(0)
            log.info("stopping idle model %s to make room for %s under the memory budget", v.name, h.name)
            used -= v.memory_estimate
            await v.stop()
        if used + need > budget:
            log.warning("%s exceeds the memory budget (%d + %d > %d bytes) and nothing idle can be stopped",
                        h.name, used, need, budget)

    async def _reap_idle(self) -> None:
        """Stop workers idle for longer than their model's idle_ttl."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for h in list(self.handles.values()):
                ttl = h.cfg.idle_ttl
                if ttl and h.running and h.state == "ready" and not h.cfg.pinned and not h.busy \
                        and now - (h.last_used or h.started_wall) > ttl:
                    log.info("model %s idle for %.0fs: stopping its worker", h.name, ttl)
                    await h.stop()

    async def apply(self, new: Config) -> dict:
        """Make the running state match `new`; returns what changed, by model name."""
        async with self._lock:
            changes = {"added": [], "removed": [], "replaced": [], "updated": [], "unchanged": []}
            if new.server != self.config.server and self.generation:
                log.warning("server settings changed; host/port apply at the next restart")
            self.config = new
            wanted = {m.name: m for m in new.models}
            for name in [n for n in self.handles if n not in wanted]:
                h = self.handles.pop(name)
                self._cancel_pending(name)
                self._spawn(h.drain(new.server.drain_timeout))
                changes["removed"].append(name)
            for name, m in wanted.items():
                h = self.handles.get(name)
                if h is None:
                    self.handles[name] = self._new_handle(m)
                    changes["added"].append(name)
                elif (h.cfg.worker_key() != m.worker_key() or h.state == "failed") and not h.running:
                    self.handles[name] = self._new_handle(m)      # not loaded: nothing to switch over
                    self._spawn(h.stop())
                    changes["replaced"].append(name)
                elif h.cfg.worker_key() != m.worker_key() or h.state == "failed":
                    pending = self.pending.get(name)
                    if pending is not None and pending.cfg.worker_key() == m.worker_key():
                        pending.cfg = m
                    else:
                        self._cancel_pending(name)
                        self.pending[name] = self._new_handle(m, load=True)
                        self._spawn(self._switch_when_ready(name, self.pending[name]))
                    changes["replaced"].append(name)
                elif h.cfg != m:
                    h.cfg = m
                    changes["updated"].append(name)
                else:
                    changes["unchanged"].append(name)
            self._route()
            self.generation += 1
            self.loaded_at = time.time()
            self.last_error = None
            log.info("config generation %d applied: %s", self.generation,
                     ", ".join(f"{k} {v}" for k, v in changes.items() if v and k != "unchanged") or "no changes")
            return changes

    def _cancel_pending(self, name: str) -> None:
        old = self.pending.pop(name, None)
        if old is not None:
            self._spawn(old.stop())

    async def _switch_when_ready(self, name: str, new: ModelHandle) -> None:
        """Route to the replacement once it is ready, then drain the old worker."""
        while new.state not in ("ready", "failed", "stopped"):
            await asyncio.sleep(0.05)
        async with self._lock:
            if self.pending.get(name) is not new:
                return
            del self.pending[name]
            if new.state != "ready":
                self.last_error = f"model {name!r}: new settings failed to load, still serving the old ones: {new.last_error}"
                log.error("%s", self.last_error)
                self._spawn(new.stop())
                return
            old = self.handles.get(name)
            self.handles[name] = new
            self._route()
        if old is not None:
            await old.drain(self.config.server.drain_timeout)

    async def reload(self) -> dict:
        """Re-read the config file; a bad one leaves everything running as it was."""
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            self.config_failed(str(e))
            return {"applied": False, "error": str(e)}
        changes = await self.apply(new)
        self.metrics.reloads.labels("success").inc()
        return {"applied": True, "generation": self.generation, "changes": changes}

    def config_failed(self, error: str) -> None:
        self.last_error = error
        self.metrics.reloads.labels("error").inc()
        log.error("config not applied, the running models are unchanged:\n%s", error)

    def _route(self) -> None:
        self.routes = {}
        for h in self.handles.values():
            for n in (h.name, *h.cfg.aliases):
                self.routes[n] = h

    def get(self, name: str) -> Optional[ModelHandle]:
        return self.routes.get(name)

    def status(self) -> dict:
        return {"path": self.config_path, "generation": self.generation, "loaded_at": self.loaded_at,
                "last_error": self.last_error}

    def in_flight(self) -> int:
        return sum(h.worker.in_flight for h in self.all_handles() if h.worker is not None)

    def all_handles(self) -> list[ModelHandle]:
        return [*self.handles.values(), *self.pending.values()]

    def kill_workers(self) -> None:
        for h in self.all_handles():
            if h.worker is not None and h.worker.proc is not None and h.worker.proc.returncode is None:
                h.worker.proc.kill()

    async def stop(self, timeout: float = 30.0) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*(h.stop(timeout) for h in self.all_handles()), return_exceptions=True)
