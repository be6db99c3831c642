"""WorkerProcess's own failure paths, with a stand-in child instead of a model (fast)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from daemon import process
from daemon.config import ModelConfig
from daemon.process import WorkerGone, WorkerProcess

READY = ("import os, sys, time\n"
         "from daemon.protocol import encode\n"
         "os.write(int(sys.argv[1]), encode({'op': 'ready', 'pid': os.getpid(), 'device': 'cpu', 'dtype': 'f32',"
         " 'blas': 'none', 'load_seconds': 0.0}))\n"
         "time.sleep(120)\n")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_failed_spawn_leaks_no_socket_and_is_a_worker_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))

    async def main():
        before = open_fds()
        for _ in range(3):
            wp = WorkerProcess(ModelConfig(name="m", source="embedded:smollm2"), tmp_path)
            with pytest.raises(WorkerGone, match="cannot start"):
                await wp.start(5)
        return before, open_fds()
    before, after = asyncio.run(main())
    assert after == before


def stand_in(monkeypatch):
    """Spawn READY in place of `python -m daemon.worker`, on the same socket."""
    real = asyncio.create_subprocess_exec

    async def spawn(*args, **kw):
        fd = args[args.index("--fd") + 1]
        return await real(sys.executable, "-c", READY, fd, pass_fds=kw["pass_fds"], env=kw["env"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(process.__file__))),
                          start_new_session=True)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)


def test_a_reader_task_that_dies_takes_the_worker_down_with_it(tmp_path, monkeypatch):
    """Before: the reader task was neither held nor watched, so its end left the model ready
    with nobody reading the worker's frames and `exited` never resolved."""
    stand_in(monkeypatch)

    async def main():
        wp = WorkerProcess(ModelConfig(name="m", source="embedded:smollm2"), tmp_path)
        await wp.start(60)
        reader = next(t for t in asyncio.all_tasks() if t.get_name() == "worker-reader-m")
        reader.cancel()
        code = await asyncio.wait_for(asyncio.shield(wp.exited), 30)
        assert wp.proc.returncode is not None and code == wp.proc.returncode
        with pytest.raises(WorkerGone, match="reader"):
            await anext(wp.generate({"prompt": "hi"}))
    asyncio.run(main())
