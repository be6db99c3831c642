"""Faults inside a worker fail the request they touch, never the worker; a broken IPC frame
ends the worker at once instead of leaving its requests hanging."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import mlx.core as mx
import openai
import pytest
from openai import OpenAI

from conftest import ROOT, TEST_CACHE, Daemon, smol
from daemon.config import ModelConfig
from daemon.process import WorkerGone, WorkerProcess, worker_env
from daemon.protocol import MAX_FRAME, SyncChannel

CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(8))


def chat(c: OpenAI, messages: list[dict]):
    r = c.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    return r.choices[0].message.content, r.usage


def wait_for_writes(d: Daemon) -> None:
    for _ in range(300):
        if httpx.get(f"{d.url}/v1/cache/stats", timeout=30).json()["models"]["m"]["disk"]["pending_writes"] == 0:
            return
        time.sleep(0.1)
    raise TimeoutError("writes still pending")


def poison(entry) -> None:
    """Rewrite an entry with KV of the wrong shape for this model (as a cache written by other
    code could be), with a valid checksum, so it passes every check on the way in."""
    arrays, meta = mx.load(str(entry), return_metadata=True)
    first = sorted(arrays)[0]
    arrays[first] = arrays[first][..., :16]
    mx.save_safetensors(str(entry), arrays, metadata=meta)
    record_path = entry.with_suffix(".json")
    record = json.loads(record_path.read_text())
    data = entry.read_bytes()
    record.update(size=len(data), crc32=zlib.crc32(data))
    record_path.write_text(json.dumps(record))


def test_entries_over_the_memory_budget_and_a_failing_batch_leave_the_worker_serving(tmp_path):
    # Every entry is larger than memory: it is served from disk, across a restart.
    d = Daemon(tmp_path, [smol("m", prefix_cache={"memory_budget": "1KB"})])
    d.start()
    try:
        c = OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0, timeout=300)
        msgs = [{"role": "user", "content": f"Here is my module:\n{CODE}\nWhat does it define?"}]
        answer, first = chat(c, msgs)
        pid = d.model_status("m")["pid"]
        msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And f3(2)?"}]
        answer, second = chat(c, msgs)
        assert second.prompt_tokens_details.cached_tokens >= first.prompt_tokens + first.completion_tokens - 4
        wait_for_writes(d)
        d.stop()
        d.start()
        msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Thanks."}]
        _, third = chat(c, msgs)
        assert third.prompt_tokens_details.cached_tokens >= second.prompt_tokens + second.completion_tokens - 4
        pid = d.model_status("m")["pid"]
        wait_for_writes(d)

        # A cached entry that breaks the batch: that request gets a 500, the worker stays.
        d.stop()
        (entry,) = (d.cache_dir / "prefix").glob("*/*.safetensors")
        poison(entry)
        d.start()
        pid = d.model_status("m")["pid"]
        with pytest.raises(openai.InternalServerError) as err:
            chat(c, msgs)
        assert err.value.status_code == 500 and err.value.body["code"] == "internal_error"
        _, again = chat(c, msgs)                  # the entry that broke it is gone
        assert again.prompt_tokens_details.cached_tokens == 0
        st = d.model_status("m")
        assert st["pid"] == pid and st["restarts"] == 0 and st["state"] == "ready"
        for _ in range(100):      # the worker's own counters arrive with its next stats poll
            if d.model_status("m")["internal_errors"]:
                break
            time.sleep(0.1)
        st = d.model_status("m")
        assert (st["internal_errors"], st["batch_resets"]) == (1, 1)
        metrics = httpx.get(f"{d.url}/metrics", timeout=10).text
        assert 'mlxd_request_errors_total{model="m",reason="internal_error"} 1.0' in metrics
        assert 'mlxd_worker_internal_errors_total{model="m"} 1.0' in metrics
        assert 'mlxd_batch_resets_total{model="m"} 1.0' in metrics
    finally:
        d.stop()


def test_a_failure_while_handling_one_frame_is_a_500_for_that_request():
    from daemon.worker.__main__ import handle

    class Broken:      # the engine's part is stubbed: this is the frame dispatch alone
        internal_errors = 0
        prefix_cache = None

        def submit(self, msg):
            raise KeyError("boom")

    engine = Broken()
    reply = handle(engine, {"op": "submit", "id": "r1"})
    assert reply["op"] == "error" and reply["id"] == "r1" and reply["status"] == 500
    assert reply["code"] == "internal_error" and "boom" in reply["message"]
    assert engine.internal_errors == 1


STAND_IN = ("import os, sys, time\n"
            "fd = int(sys.argv[1])\n"
            "os.read(fd, 1 << 16)\n"                 # the daemon's submit
            "os.write(fd, bytes.fromhex(sys.argv[2]))\n"
            "time.sleep(120)\n")


@pytest.mark.parametrize("frame", [struct.pack(">I", 5) + b"{bad}", struct.pack(">I", MAX_FRAME + 1),
                                   struct.pack(">I", 2) + b"[]"], ids=["bad-json", "oversized", "not-an-object"])
def test_a_malformed_frame_from_the_worker_kills_it_and_fails_its_requests(tmp_path, frame):
    """A stand-in process plays the worker (a real one never sends such frames)."""
    async def scenario():
        wp = WorkerProcess(ModelConfig(name="m", source="embedded:smollm2"), tmp_path)
        parent, child = socket.socketpair()
        wp.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STAND_IN, str(child.fileno()), frame.hex(), pass_fds=(child.fileno(),))
        child.close()
        reader, wp._writer = await asyncio.open_unix_connection(sock=parent)
        asyncio.create_task(wp._read(reader))
        with pytest.raises(WorkerGone, match="protocol error"):
            await asyncio.wait_for(anext(wp.generate({"prompt": "hi"})), 30)
        assert wp.exited.done() and wp.proc.returncode == -signal.SIGKILL
        assert "protocol error" in wp.exit_reason

    asyncio.run(scenario())


def test_a_malformed_frame_from_the_daemon_ends_the_worker(tmp_path):
    cfg = ModelConfig(name="m", source="embedded:smollm2", prefix_cache={"enabled": False})
    parent, child = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.worker", "--fd", str(child.fileno()),
         "--model", json.dumps(cfg.model_dump(mode="json")), "--cache-dir", str(TEST_CACHE)],
        pass_fds=(child.fileno(),), cwd=ROOT, env=worker_env(), stderr=open(tmp_path / "worker.log", "wb"))
    child.close()
    try:
        parent.settimeout(300)
        assert SyncChannel(parent).recv()["op"] == "ready"
        parent.sendall(struct.pack(">I", MAX_FRAME + 1))      # a length no frame may have
        assert proc.wait(60) == 0
        assert "protocol error" in (tmp_path / "worker.log").read_text()
    finally:
        proc.kill()
        proc.wait()
        parent.close()
