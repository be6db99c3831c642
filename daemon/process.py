"""One worker OS process, seen from the daemon: spawn, talk, watch it die.

The daemon never imports MLX; each model's MLX state lives in its own process, so a crash,
an OOM kill or an unload takes only that model's requests and memory with it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Optional

from . import ranks
from .config import ModelConfig
from .protocol import GROUP_FAILED, encode, read_frame
from .worker.blas import optimized_blas
from .worker.transport import new_secret

log = logging.getLogger("mlxd.process")
ROOT = Path(__file__).resolve().parent.parent     # a remote rank runs from the same path on its host


class WorkerGone(Exception):
    """The worker exited (or never came up); the message says how, for the client."""


class RequestTimeout(Exception):
    """The request's deadline passed; it is cancelled in the worker."""


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "closed its connection"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


async def _put_secret(host: str, secret: str, timeout: float = 30.0) -> str:
    """Write a group's secret into a 0600 temp file on `host` over ssh's stdin; its path there."""
    proc = await asyncio.create_subprocess_exec(*ranks.secret_command(host), stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(secret.encode()), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise ValueError(f"distributed host {host}: writing the group's secret over ssh timed out") from None
    if proc.returncode != 0 or not out.strip():
        raise ValueError(f"distributed host {host}: writing the group's secret over ssh failed "
                         f"(exit {proc.returncode})")
    return out.decode().strip()


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    blas = optimized_blas()
    if blas and blas not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (blas, env.get("LD_PRELOAD")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class WorkerProcess:
    def __init__(self, cfg: ModelConfig, cache_dir: Path, server=None):
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.server = server            # config.Server: the prefix cache's directory-wide settings
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.info: dict = {}
        self._writer: Optional[asyncio.StreamWriter] = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()
        self.exit_reason = ""
        self.last_frame = time.monotonic()     # any frame is a sign of life (stats come every 2 s)
        self.ranks: list[tuple[int, str, asyncio.subprocess.Process]] = []   # a group's ranks 1..n-1
        self._files: list[Path] = []          # the group's hostfile (or jaccl's device list)
        self._watchers: list[asyncio.Task] = []
        self._stopping = False
        self.stop_timeout = 0.0
        self._reader: Optional[asyncio.Task] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def start(self, timeout: float) -> dict:
        """Spawn and wait for the model to load; raises WorkerGone if it does not."""
        env, extra = worker_env(), []
        if self.cfg.distributed is not None:
            try:
                env, extra = await self._start_ranks(env)
            except (ValueError, OSError) as e:
                await self._kill_ranks()
                raise WorkerGone(f"model {self.cfg.name!r} cannot start its group: {e}") from None
        parent, child = socket.socketpair()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon.worker", "--fd", str(child.fileno()),
                "--model", json.dumps(self.cfg.model_dump(mode="json")), "--cache-dir", str(self.cache_dir),
                *self._cache_args(), *extra,
                pass_fds=(child.fileno(),), env=env, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True)
        except BaseException as e:
            parent.close()                  # else every failed spawn leaks our end of the socket
            await self._kill_ranks()
            if isinstance(e, OSError):
                raise WorkerGone(f"model {self.cfg.name!r} cannot start its worker: {e}") from None
            raise
        finally:
            child.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        # Held (the loop keeps only a weak reference) and watched: if it ends before the
        # worker's exit was handled, nothing reads the worker any more, so the worker goes.
        self._reader = asyncio.create_task(self._read(reader), name=f"worker-reader-{self.cfg.name}")
        self._reader.add_done_callback(self._reader_done)
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise WorkerGone(f"model {self.cfg.name!r} did not load within {timeout:.0f}s") from None
        if self.ranks:
            self.info["ranks"] = [{"rank": r, "host": h, "pid": p.pid} for r, h, p in self.ranks]
        return self.info

    def _cache_args(self) -> list[str]:
        if self.server is None:
            return []
        out = ["--cache-orphan-ttl", str(self.server.cache_orphan_ttl)]
        if self.server.cache_disk_budget is not None:
            out += ["--cache-disk-budget", str(self.server.cache_disk_budget)]
        return out

    async def _start_ranks(self, env: dict) -> tuple[dict, list[str]]:
        """Start ranks 1..n-1 of a distributed model; rank 0's environment and arguments."""
        dist = self.cfg.distributed
        plan = ranks.plan(dist)
        for host in {h for h in dist.hosts[1:] if not ranks.is_local(h)}:
            await asyncio.to_thread(ranks.check_reachable, host)
        paths = {}
        for var, content in plan.files.items():
            fd, path = tempfile.mkstemp(prefix=f"mlxd-{var.lower()}-{os.getpid()}-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(content)
            self._files.append(Path(path))
            paths[var] = path
        model = json.dumps(self.cfg.model_dump(mode="json"))
        # This start's secret: every doorbell connection, the ring and each step broadcast prove
        # it (worker/transport.py). In the environment or on ssh's stdin, never in an argv.
        secret = {"MLXD_GROUP_SECRET": new_secret()}
        for r, host in enumerate(dist.hosts[1:], start=1):
            args = ranks.follower_args(r, model, self.cache_dir, plan.doorbell, self._cache_args())
            if ranks.is_local(host):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, *args, env={**env, **plan.env(r, paths), **secret},
                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            else:
                where = {"MLXD_GROUP_SECRET_FILE": await _put_secret(host, secret["MLXD_GROUP_SECRET"])}
                proc = await asyncio.create_subprocess_exec(
                    *ranks.remote_command(host, r, plan, sys.executable, str(ROOT), args, env=where),
                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            self.ranks.append((r, host, proc))
            # held here: the loop keeps only a weak reference to a task
            watch = asyncio.create_task(self._watch_rank(r, host, proc), name=f"rank-{r}-{self.cfg.name}")
            self._watchers.append(watch)
        log.info("model %s: started ranks 1..%d of its group (%s)", self.cfg.name, len(dist.hosts) - 1,
                 ", ".join(f"{r}: {h} pid {p.pid}" for r, h, p in self.ranks))
        return {**env, **plan.env(0, paths), **secret}, ["--doorbell", plan.doorbell]

    async def _watch_rank(self, r: int, host: str, proc) -> None:
        """A rank that exits takes the group down: rank 0 is killed with the reason, so the
        in-flight requests fail at once and the handle restarts the whole group."""
        code = await proc.wait()
        if self.exited.done() or self._stopping or self.proc is None or self.proc.returncode is not None:
            return
        why = self._lost(r, host, code)
        log.error("%s; restarting the group", why)
        await self.kill(why)

    def _lost(self, r: int, host: str, code: int) -> str:
        return f"the worker for model {self.cfg.name!r} lost rank {r} of its group ({host}), which {_describe_exit(code)}"

    async def _blame_rank(self, wait: float = 1.0) -> None:
        """Rank 0 saw the group break before we saw why: a rank killed by a signal is the cause
        (a rank never dies of a signal because another one failed), so the client hears of it."""
        await asyncio.wait([asyncio.ensure_future(p.wait()) for _, _, p in self.ranks], timeout=wait,
                           return_when=asyncio.FIRST_COMPLETED)
        for r, host, proc in self.ranks:
            if proc.returncode is not None and proc.returncode < 0:
                self.exit_reason = self._lost(r, host, proc.returncode)
                return

    async def _kill_ranks(self, grace: float = 0.0) -> None:
        """Reap every other rank of the group (given `grace` seconds to exit on their own first)."""
        if grace and self.ranks:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for _, _, p in self.ranks], timeout=grace)
        for _, _, proc in self.ranks:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            await proc.wait()
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files = []

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            await self._dispatch(reader)
        except Exception as e:     # a frame we cannot read: nothing after it can be trusted
            log.error("protocol error from the worker for model %s (pid %s): %s; killing it",
                      self.cfg.name, self.pid, e)
            await self.kill(f"the worker for model {self.cfg.name!r} was killed after a protocol error: {e}")
        await self._exited()

    def _reader_done(self, task: asyncio.Task) -> None:
        if self.exited.done():
            return
        why = "was cancelled" if task.cancelled() else f"failed: {task.exception()!r}"
        log.error("the reader of the worker for model %s (pid %s) %s; killing the worker", self.cfg.name,
                  self.pid, why)
        self.exit_reason = f"the worker for model {self.cfg.name!r} was killed: its reader task {why}"
        self.kill_now()
        self._watchers.append(asyncio.ensure_future(self._exited()))

    async def _dispatch(self, reader: asyncio.StreamReader) -> None:
        while (msg := await read_frame(reader)) is not None:
            self.last_frame = time.monotonic()
            op = msg["op"]
            if op == "ready":
                self._ready.done() or self._ready.set_result(msg)
            elif op == "fatal":
                self.exit_reason = msg["message"]
            elif "seq" in msg and msg["seq"] is not None and op in ("stats", "cache_cleared", "token_count"):
                fut = self._calls.pop(msg["seq"], None)
                if fut and not fut.done():
                    fut.set_result(msg)
            elif (q := self._streams.get(msg.get("id"))) is not None:
                q.put_nowait(msg)

    async def _exited(self) -> None:
        """The worker is gone (or was killed): every waiter learns why, at once."""
        code = await self.proc.wait() if self.proc else None
        if self.ranks and self.exit_reason.startswith(GROUP_FAILED):
            await self._blame_rank()
        # The other ranks of a group: after a clean stop they exit on their own (their caches flushed).
        await self._kill_ranks(grace=self.stop_timeout if self._stopping else 0.0)
        why = f"the worker for model {self.cfg.name!r} {_describe_exit(code)}"
        if self.exit_reason.startswith("the worker"):
            why = self.exit_reason
        elif self.exit_reason:
            why += f": {self.exit_reason}"
        self.exit_reason = why
        gone = WorkerGone(why)
        if not self._ready.done():
            self._ready.set_exception(gone)
            self._ready.exception()  # mark retrieved when nobody waits any more
        for q in self._streams.values():
            q.put_nowait(gone)
        for fut in self._calls.values():
            fut.done() or fut.set_exception(gone)
        self._calls.clear()
        self.exited.set_result(code)

    def _send(self, msg: dict) -> None:
        if self.exited.done() or self._writer is None:
            raise WorkerGone(self.exit_reason or f"the worker for model {self.cfg.name!r} is not running")
        self._writer.write(encode(msg))

    async def call(self, op: str, timeout: float = 30.0, **fields) -> dict:
        seq = next(self._seq)
        fut = asyncio.get_running_loop().create_future()
        self._calls[seq] = fut
        self._send({**fields, "op": op, "seq": seq})
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._calls.pop(seq, None)

    async def generate(self, payload: dict, timeout: Optional[float] = None) -> AsyncIterator[dict]:
        """Submit a request and yield its events until `done`; cancels it if abandoned.

        The deadline is a timer that puts RequestTimeout into the request's own queue, so
        no extra task (and no wait_for, which can swallow a cancellation) sits in between.
        """
        rid = f"r{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = q
        finished = False
        timer = asyncio.get_running_loop().call_later(timeout, q.put_nowait, RequestTimeout(timeout)) \
            if timeout else None
        try:
            self._send({"op": "submit", "id": rid, **payload})
            while True:
                ev = await q.get()
                if isinstance(ev, WorkerGone):
                    finished = True
                    raise ev
                if isinstance(ev, Exception):
                    raise ev
                if ev["op"] in ("done", "error"):
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if timer is not None:
                timer.cancel()
            self._streams.pop(rid, None)
            if not finished and not self.exited.done():
                self._send({"op": "cancel", "id": rid})

    async def stop(self, timeout: float = 30.0) -> None:
        """Ask the worker to finish (it flushes its prefix cache), then make sure it is gone."""
        if self.proc is None or self.exited.done():
            return
        self._stopping, self.stop_timeout = True, timeout
        try:
            self._send({"op": "shutdown"})
            await self._writer.drain()
        except (WorkerGone, ConnectionError):
            pass
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            log.warning("worker %s (pid %s) did not stop in %.0fs; killing it", self.cfg.name, self.pid, timeout)
            await self.kill()

    def kill_now(self) -> None:
        """SIGKILL from synchronous code (a second stop signal); the reader task notices the exit."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    async def kill(self, reason: str = "") -> None:
        if reason:
            self.exit_reason = reason
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()
