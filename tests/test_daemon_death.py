"""A daemon that dies with a request in flight: its worker still writes that request's cache.

The worker sees the socket close, cancels what is in flight (which stores the KV) and its
replies then fail with a broken pipe; the prefix cache must still be closed, which drains
the disk queue, before the worker exits.
"""

from __future__ import annotations

import signal
import threading

from conftest import Daemon, alive, smol, wait_until




def test_the_in_flight_entry_reaches_disk_when_the_daemon_is_killed(tmp_path):
    d = Daemon(tmp_path, [smol("m", sampling={"temperature": 0.0})]).start()
    try:
        pid = d.model_status("m")["pid"]
        got = []

        def stream():
            try:
                for chunk in d.openai().completions.create(model="m", prompt="1, 2, 3, 4, 5,", max_tokens=2000,
                                                           stream=True):
                    got.append(chunk)
            except Exception:
                pass        # the daemon is killed under it

        threading.Thread(target=stream, daemon=True).start()
        wait_until(lambda: len(got) >= 3, 120, "the request's first tokens")
        assert not list((d.cache_dir / "prefix").rglob("*.safetensors"))    # nothing is stored mid-request
        d.stop(signal.SIGKILL)
        wait_until(lambda: not alive(pid), 60, "the worker to exit after its daemon")
        entries = list((d.cache_dir / "prefix").rglob("*.safetensors"))
        records = [p.with_suffix(".json") for p in entries if p.with_suffix(".json").exists()]
        assert records, f"the cancelled request's cache was not written; worker log:\n{d.tail()}"
    finally:
        d.stop(signal.SIGKILL)
