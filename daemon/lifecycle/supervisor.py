"""Desired state (the config) vs actual state (one handle per model), and the loop between.

The supervisor diffs each new config against the running handles, routes names and aliases
to them, and loads models single-flight. Each handle's own lifecycle is in handle.py; the
memory budget and the idle reaper are in budget.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

from ..config import Config, ConfigError, ModelConfig, Server, load_config
from ..metrics import Metrics
from .budget import MemoryBudget
from .handle import ModelHandle
from .plan import KIND, Add, CancelPending, Remove, Replace, ReplaceNow, Retarget, Update, plan
from .port import Spawn, spawn_process

log = logging.getLogger("mlxd.supervisor")

RESTART_DAEMON = ("host", "port")                 # the listening socket is bound once
NEW_WORKERS_ONLY = ("cache_dir",)                 # a running worker keeps the directory it opened


def server_changes(old: Server, new: Server) -> list[str]:
    return [f for f in Server.model_fields if getattr(old, f) != getattr(new, f)]


class Supervisor:
    """Converges the running models to the config: start, replace, reconfigure, drain, stop.

    A model whose entry did not change is never touched. A changed engine or source gets a
    new worker beside the old one; routing switches only once the new one is ready, then
    the old one drains. Aliases, sampling defaults and server settings apply live.
    """

    def __init__(self, config: Config, json_logs: bool = False, config_path: Optional[str] = None,
                 spawn: Spawn = spawn_process):
        self.config = config
        self.spawn_worker = spawn                     # the worker seam (port.py)
        self.metrics = Metrics(self, json_logs=json_logs)
        self.budget = MemoryBudget(self)
        self.handles: dict[str, ModelHandle] = {}
        self.pending: dict[str, ModelHandle] = {}     # replacements still loading
        self.routes: dict[str, ModelHandle] = {}
        self.started = time.time()
        self.config_path = config_path
        self.generation = 0
        self.loaded_at: Optional[float] = None
        self.last_error: Optional[str] = None
        self.listeners: list[Callable[[Server], None]] = []   # told the server settings after each apply
        self._tasks: set[asyncio.Task] = set()
        self._retiring: set[ModelHandle] = set()       # removed or replaced, draining
        self._lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self.draining = False

    async def start(self) -> None:
        await self.apply(self.config)
        self.spawn(self.budget.reap_idle())

    def spawn(self, coro) -> asyncio.Task:
        """A background task whose failure is logged and counted, never lost."""
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and (e := t.exception()) is not None:
            log.error("background task %s failed", t.get_coro().__qualname__, exc_info=e)
            self.metrics.internal_error("supervisor")

    def _new_handle(self, m: ModelConfig, load: bool = False) -> ModelHandle:
        h = ModelHandle(m, lambda: self.config.server, self.metrics, self.spawn_worker)
        h.on_demand = self.ensure_loaded
        h.on_ready = lambda h: self.spawn(self._fit(h))
        if m.preload or load:
            self.spawn(self.ensure_loaded(h))
        return h

    async def ensure_loaded(self, h: ModelHandle) -> None:
        """Start a stopped model's worker once (single-flight), first making room under the budget."""
        async with self._load_lock:
            if h.state != "stopped" or h.retired:
                return
            await self.budget.make_room(h)
            h.start()

    async def _fit(self, h: Optional[ModelHandle]) -> None:
        async with self._load_lock:
            await self.budget.make_room(h)

    def healthy(self) -> bool:
        """Every preloaded model is ready (or parked by the daemon, loading at its next request)."""
        return not self.draining and all(h.state == "ready" or (h.parked and h.state != "failed")
                                         for h in self.handles.values() if h.cfg.preload)

    async def apply(self, new: Config) -> dict:
        """Make the running state match `new`; returns what changed, by model name."""
        async with self._lock:
            changes = {"added": [], "removed": [], "replaced": [], "updated": [], "unchanged": []}
            old_server = self.config.server
            self.config = new
            if self.generation:
                self._log_server_changes(old_server, new.server)
            for action in plan(new, self.handles, self.pending):
                self._do(action, new)
                if (kind := KIND.get(type(action))) is not None:
                    changes[kind].append(action.name if hasattr(action, "name") else action.cfg.name)
            self._route()
            self.generation += 1
            self.loaded_at = time.time()
            self.last_error = None
            for listener in self.listeners:
                listener(new.server)
            if new.server.memory_budget != old_server.memory_budget:
                self.spawn(self._fit(None))
            log.info("config generation %d applied: %s", self.generation,
                     ", ".join(f"{k} {v}" for k, v in changes.items() if v and k != "unchanged") or "no changes")
            return changes

    def _do(self, a, new: Config) -> None:
        """Carry out one action of the plan (plan.py); nothing here awaits."""
        if isinstance(a, Remove):
            h = self.handles.pop(a.name)
            self.spawn(self._retire(h, new.server.drain_timeout))
        elif isinstance(a, Add):
            self.handles[a.cfg.name] = self._new_handle(a.cfg)
        elif isinstance(a, ReplaceNow):
            h = self.handles[a.cfg.name]
            h.retire()                                   # not loaded: nothing to switch over
            self.handles[a.cfg.name] = self._new_handle(a.cfg)
            self.spawn(h.stop())
        elif isinstance(a, CancelPending):
            self._cancel_pending(a.name)
        elif isinstance(a, Replace):
            name = a.cfg.name
            self.pending[name] = self._new_handle(a.cfg, load=True)
            self.spawn(self._switch_when_ready(name, self.pending[name]))
        elif isinstance(a, Retarget):
            self.pending[a.cfg.name].cfg = a.cfg
        elif isinstance(a, Update):
            self.handles[a.cfg.name].cfg = a.cfg

    def _log_server_changes(self, old: Server, new: Server) -> None:
        changed = server_changes(old, new)
        if not changed:
            return
        live = [f for f in changed if f not in RESTART_DAEMON + NEW_WORKERS_ONLY]
        if live:
            log.info("server settings applied live: %s", ", ".join(f"server.{f}" for f in live))
        for f in changed:
            if f in RESTART_DAEMON:
                log.warning("server.%s changed: it applies when mlxd restarts (still listening on %s:%s)",
                            f, old.host, old.port)
            elif f in NEW_WORKERS_ONLY:
                log.warning("server.%s changed: workers started from now on use it; running ones keep %s "
                            "until they restart", f, getattr(old, f) or "the default")

    def _cancel_pending(self, name: str) -> None:
        old = self.pending.pop(name, None)
        if old is not None:
            old.retire()
            self.spawn(old.stop())

    async def _switch_when_ready(self, name: str, new: ModelHandle) -> None:
        """Route to the replacement once it is ready, then drain the old worker."""
        await new.settled()
        async with self._lock:
            if self.pending.get(name) is not new:
                return
            del self.pending[name]
            if new.state != "ready":
                self.last_error = f"model {name!r}: new settings failed to load, still serving the old ones: {new.last_error}"
                log.error("%s", self.last_error)
                new.retire()
                self.spawn(new.stop())
                return
            old = self.handles.get(name)
            self.handles[name] = new
            self._route()
        if old is not None:
            await self._retire(old, self.config.server.drain_timeout)

    async def _retire(self, h: ModelHandle, timeout: float) -> None:
        self._retiring.add(h)
        try:
            await h.drain(timeout)
        finally:
            self._retiring.discard(h)

    async def reload(self) -> dict:
        """Re-read the config file; a bad one leaves everything running as it was. Never raises:
        the config watcher and SIGHUP depend on it."""
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            self.config_failed(str(e))
            return {"applied": False, "error": str(e)}
        try:
            changes = await self.apply(new)
        except Exception as e:
            log.exception("applying the config failed")
            self.metrics.internal_error("reload")
            self.config_failed(f"internal error while applying the config: {e!r}")
            return {"applied": False, "error": self.last_error}
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
        return sum(h.in_flight for h in self.all_handles())

    def all_handles(self) -> list[ModelHandle]:
        return [*self.handles.values(), *self.pending.values()]

    def kill_workers(self) -> None:
        for h in self.all_handles():
            h.kill_now()

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*(h.stop() for h in {*self.all_handles(), *self._retiring}), return_exceptions=True)
