"""The worker seam: what a model's handle needs from its worker, and nothing more.

`process.WorkerProcess` (a real OS process over a socketpair) implements it; tests give the
handle and the supervisor a double that loads, serves and dies when told, so lifecycle races
run in milliseconds without a model (as llama-swap's tests do with a fake upstream).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Protocol

from ..config import ModelConfig, Server


class Worker(Protocol):
    info: dict                    # the worker's `ready` frame: pid, device, dtype, load time, ...
    exited: asyncio.Future        # resolves (to the exit code) once the worker is gone
    exit_reason: str              # why it is gone, for the client and the log
    last_frame: float             # monotonic time of its last sign of life

    @property
    def pid(self) -> Optional[int]: ...

    @property
    def in_flight(self) -> int: ...

    async def start(self, timeout: float) -> dict:
        """Spawn and wait until the model is loaded; raises WorkerGone if it does not come up."""

    async def stop(self, timeout: float) -> None:
        """Ask it to finish (flushing its cache); kill it past `timeout`."""

    async def kill(self, reason: str = "") -> None:
        """End it now; `reason` becomes its exit reason."""

    def kill_now(self) -> None:
        """End it from synchronous code (a second stop signal), waiting for nothing."""

    async def call(self, op: str, timeout: float = 30.0, **fields) -> dict:
        """One request/reply operation (stats, cache_clear, count_tokens)."""

    def generate(self, payload: dict, timeout: Optional[float] = None) -> AsyncIterator[dict]:
        """Submit a request and yield its events until `done` or `error`; cancels it if abandoned."""


# How a handle gets a worker: (model, cache directory, server settings) -> a worker not yet started.
Spawn = Callable[[ModelConfig, Path, Server], Worker]


def spawn_process(cfg: ModelConfig, cache_dir: Path, server: Server) -> Worker:
    from ..process import WorkerProcess
    return WorkerProcess(cfg, cache_dir, server)
