"""A worker double for lifecycle tests: daemon/lifecycle/port.py's `Worker`, with no process.

It loads when the test says so, answers requests with the settings it was started with (so a
test sees which worker served), and dies on demand. Races between reloads, loads, parking and
crashes then run in milliseconds, on the real ModelHandle and Supervisor.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Optional

from daemon.process import RequestTimeout, WorkerGone

_pids = itertools.count(1000)


class FakeWorker:
    def __init__(self, cfg, cache_dir, server, farm: "Farm"):
        loop = asyncio.get_running_loop()
        self.cfg, self.farm = cfg, farm
        self.info: dict = {}
        self.exited: asyncio.Future = loop.create_future()
        self.exit_reason = ""
        self.last_frame = time.monotonic()
        self.loaded: asyncio.Future = loop.create_future()   # the test resolves it: True, or an error message
        self.requests: list[asyncio.Queue] = []
        self.calls: list[str] = []
        self.stopped_cleanly = False
        self.silent = False
        self._pid = next(_pids)
        if farm.auto_ready:
            self.loaded.set_result(True)

    @property
    def pid(self) -> Optional[int]:
        return self._pid

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    # -- what the test does ----------------------------------------------------------

    def ready(self) -> None:
        self.loaded.done() or self.loaded.set_result(True)

    def fail_load(self, message: str = "cannot load") -> None:
        self.loaded.done() or self.loaded.set_result(message)

    def hang(self) -> None:
        """Silent from now on: stats calls time out and no frame comes."""
        self.silent = True
        self.last_frame -= 10_000

    def crash(self, reason: str = "was killed by SIGSEGV") -> None:
        self._exit(-11, f"the worker for model {self.cfg.name!r} {reason}")

    # -- the port ------------------------------------------------------------------------

    async def start(self, timeout: float) -> dict:
        done, _ = await asyncio.wait([self.loaded, self.exited], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self.exited.done():
            raise WorkerGone(self.exit_reason or "the fake worker exited while loading")
        if not done:
            await self.kill()
            raise WorkerGone(f"model {self.cfg.name!r} did not load within {timeout:.0f}s")
        if self.loaded.result() is not True:
            self._exit(1, f"the worker for model {self.cfg.name!r} exited with status 1: {self.loaded.result()}")
            raise WorkerGone(self.exit_reason)
        self.info = {"op": "ready", "pid": self._pid, "device": "fake", "dtype": self.cfg.dtype, "blas": "none",
                     "load_seconds": 0.0, "mlx_memory_bytes": 1}
        return self.info

    async def stop(self, timeout: float = 30.0) -> None:
        self.stopped_cleanly = not self.exited.done()
        self._exit(0, "")

    async def kill(self, reason: str = "") -> None:
        self._exit(-9, reason)

    def kill_now(self) -> None:
        self._exit(-9, "")

    async def call(self, op: str, timeout: float = 30.0, **fields) -> dict:
        if self.exited.done():
            raise WorkerGone(self.exit_reason or "gone")
        self.calls.append(op)
        if self.silent:
            await asyncio.sleep(timeout)
            raise asyncio.TimeoutError
        self.last_frame = time.monotonic()
        if op == "stats":
            return {"op": "stats", "running": len(self.requests), "waiting": 0, "memory_bytes": 1}
        if op == "cache_clear":
            return {"op": "cache_cleared", "entries": 0}
        if op == "count_tokens":
            return {"op": "token_count", "tokens": 3}
        raise ValueError(op)

    async def generate(self, payload: dict, timeout: Optional[float] = None):
        """`started` at once; `done` when the test puts "done" in `self.requests[i]` (or at once
        with farm.answer_at_once), saying which worker served: its pid and max_batch_size.
        Past `timeout`, RequestTimeout, as WorkerProcess raises it."""
        if self.exited.done():
            raise WorkerGone(self.exit_reason or "gone")
        q: asyncio.Queue = asyncio.Queue()
        if timeout:
            asyncio.get_running_loop().call_later(timeout, q.put_nowait, RequestTimeout(timeout))
        self.requests.append(q)
        try:
            yield {"op": "started", "id": "r", "prompt_tokens": 1, "cached_tokens": 0, "max_tokens": 1}
            if not self.farm.answer_at_once:
                ended = asyncio.ensure_future(q.get())
                await asyncio.wait([ended, self.exited], return_when=asyncio.FIRST_COMPLETED)
                if not ended.done():
                    ended.cancel()
                    raise WorkerGone(self.exit_reason or "gone")
                if isinstance(ended.result(), Exception):
                    raise ended.result()
            yield {"op": "done", "id": "r", "finish_reason": "stop",
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0},
                   "timings": {"ttft": 0.0, "total": 0.0, "queue": 0.0, "prefill": 0.0}, "served_by": self._pid,
                   "max_batch_size": self.cfg.engine.max_batch_size}
        finally:
            self.requests.remove(q)

    def _exit(self, code: int, reason: str) -> None:
        if self.exited.done():
            return
        if reason:
            self.exit_reason = reason
        self.exit_reason = self.exit_reason or f"the worker for model {self.cfg.name!r} exited with status {code}"
        self.exited.set_result(code)


class Farm:
    """Spawns FakeWorkers (the `spawn` a Supervisor or ModelHandle takes) and keeps every one."""

    def __init__(self, auto_ready: bool = False, answer_at_once: bool = True):
        self.auto_ready, self.answer_at_once = auto_ready, answer_at_once
        self.workers: list[FakeWorker] = []

    def spawn(self, cfg, cache_dir, server) -> FakeWorker:
        w = FakeWorker(cfg, cache_dir, server, self)
        self.workers.append(w)
        return w

    def alive(self) -> list[FakeWorker]:
        return [w for w in self.workers if not w.exited.done()]


async def until(cond, timeout: float = 5.0) -> None:
    """Let the loop run until `cond()` holds; the deadline only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.001)
