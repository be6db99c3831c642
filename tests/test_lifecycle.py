"""Model lifecycle: on-demand loads (single-flight), idle TTL, pinning, the memory budget,
/health, and the handle's state machine under races and faults."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, smol, wait_until

HI = [{"role": "user", "content": "Hi"}]


def client_for(d: Daemon) -> OpenAI:
    return d.openai()


def ask(c: OpenAI, model: str):
    return c.chat.completions.create(model=model, max_tokens=3, temperature=0, messages=HI)


def wait_state(d: Daemon, name: str, state: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = d.model_status(name)
        if st["state"] == state:
            return st
        time.sleep(0.1)
    raise AssertionError(f"{name} not {state} within {timeout}s: {st}")


def start_unready(d: Daemon) -> Daemon:
    """Start a daemon whose models are on demand: it is up before any model is."""
    d.log = open(d.log_path, "ab")
    import subprocess, sys
    from conftest import ROOT
    d.proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--config", str(d.config_path)],
                              cwd=ROOT, stdout=d.log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            d.status()
            return d
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(d.tail())


def test_on_demand_load_is_single_flight(tmp_path):
    d = start_unready(Daemon(tmp_path, [smol("lazy", preload=False)]))
    try:
        assert d.model_status("lazy")["state"] == "stopped"
        health = httpx.get(f"{d.url}/health", timeout=10)      # preload: false does not count
        assert health.status_code == 200 and health.json() == {"status": "ok", "models": {"lazy": "stopped"}}
        c = client_for(d)
        results = []
        threads = [threading.Thread(target=lambda: results.append(ask(c, "lazy"))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(results) == 2 and all(r.choices[0].message.content is not None for r in results)
        st = d.model_status("lazy")
        assert st["state"] == "ready" and st["workers_started"] == 1
    finally:
        d.stop()


def test_idle_ttl_stops_the_worker_and_the_next_request_reloads(tmp_path):
    d = start_unready(Daemon(tmp_path, [smol("brief", idle_ttl=2), smol("kept", idle_ttl=2, pinned=True)]))
    try:
        c = client_for(d)
        wait_state(d, "kept", "ready", timeout=120)
        ask(c, "brief")
        st = wait_state(d, "brief", "stopped", timeout=30)
        assert st["pid"] is None
        assert httpx.get(f"{d.url}/health", timeout=10).status_code == 200   # parked: loads at the next request
        started = st["workers_started"]
        time.sleep(3)
        assert d.model_status("kept")["state"] == "ready"        # pinned: never reaped
        assert ask(c, "brief").choices[0].message.content is not None
        assert d.model_status("brief")["workers_started"] == started + 1
    finally:
        d.stop()


def test_memory_budget_stops_the_least_recently_used_idle_model(tmp_path):
    # One f32 SmolLM2 worker holds ~0.55 GB of MLX memory: a 0.9 GB budget fits one.
    d = start_unready(Daemon(tmp_path, [smol("one", preload=False), smol("two", preload=False)],
                             server={"memory_budget": "900MB"}))
    try:
        c = client_for(d)
        ask(c, "one")
        time.sleep(2.5)                                        # one stats poll: its memory is known
        ask(c, "two")
        assert wait_state(d, "one", "stopped", timeout=30)["pid"] is None
        assert d.model_status("two")["state"] == "ready"
        time.sleep(2.5)
        t0 = time.monotonic()
        ask(c, "one")                                          # and back: two makes room
        waited = time.monotonic() - t0
        assert wait_state(d, "two", "stopped", timeout=30)
        st = d.model_status("one")
        assert st["state"] == "ready" and st["workers_started"] == 2
        # each load on demand is timed: status has the last (the one this request waited for),
        # /metrics counts every one
        assert 0 < st["start_seconds"] <= waited
        samples = {(s.name, s.labels["model"]): s.value
                   for f in text_string_to_metric_families(httpx.get(f"{d.url}/metrics").text)
                   for s in f.samples if s.name.startswith("mlxd_worker_start_seconds_")}
        assert {m: samples[("mlxd_worker_start_seconds_count", m)] for m in ("one", "two")} == {"one": 2, "two": 1}
        assert samples[("mlxd_worker_start_seconds_sum", "one")] > st["start_seconds"]
    finally:
        d.stop()


def test_a_model_that_cannot_load_fails_fast_and_others_serve(tmp_path):
    d = start_unready(Daemon(tmp_path, [smol("ok"), {"name": "broken", "source": str(tmp_path / "absent.gguf")}]))
    try:
        wait_state(d, "ok", "ready", timeout=120)
        st = wait_state(d, "broken", "failed", timeout=120)
        assert "ModelSourceError" in st["last_error"] and "absent.gguf" in st["last_error"]
        assert st["restarts"] >= 4
        health = httpx.get(f"{d.url}/health", timeout=10)
        assert health.status_code == 503
        assert health.json() == {"status": "failed", "models": {"ok": "ready", "broken": "failed"}}
        c = d.openai(timeout=60)       # far past an answer from the failed state: only a wait for a load hangs
        with pytest.raises(openai.APIStatusError) as e:
            ask(c, "broken")
        assert e.value.status_code == 503 and "absent.gguf" in e.value.message
        # answered from the failed state: the request tried no load of its own
        after = d.model_status("broken")
        assert (after["state"], after["workers_started"], after["restarts"]) == \
            ("failed", st["workers_started"], st["restarts"])
        assert ask(c, "ok").choices[0].message.content is not None
    finally:
        d.stop()


def test_a_request_during_a_stop_waits_for_it_then_loads_once(tmp_path):
    """Once, such a request started a second run loop: the old one took the stop for a crash and
    spawned another worker, and the stop (awaited by the idle reaper) never returned."""
    d = Daemon(tmp_path, [smol("m", idle_ttl=2)])
    d.start()
    try:
        gen = d.status()["config"]["generation"]
        d.write_config([smol("m", idle_ttl=2)], server={"worker_stop_timeout": 3})     # applies live
        wait_until(lambda: d.status()["config"]["generation"] > gen, 10, "reload")
        c = client_for(d)
        ask(c, "m")
        pid = d.model_status("m")["pid"]
        os.kill(pid, signal.SIGSTOP)           # the idle stop now lasts worker_stop_timeout, then kills it
        wait_state(d, "m", "stopping", timeout=30)
        assert ask(c, "m").choices[0].message.content is not None     # waited for the stop, loaded again
        st = d.model_status("m")
        assert (st["state"], st["workers_started"], st["restarts"]) == ("ready", 2, 0)
        assert st["pid"] != pid
        assert "did not stop in 3s; killing it" in d.tail(20000)
        st = wait_state(d, "m", "stopped", timeout=30)                   # the reaper lives on
        assert (st["workers_started"], st["restarts"]) == (2, 0)
    finally:
        d.stop()


def test_a_replacement_under_the_budget_stops_another_idle_model_not_the_one_it_replaces(tmp_path):
    # One f32 SmolLM2 worker holds ~0.54 GB: 1.3 GB fits two. The replacement of m must stop
    # the idle o (once, m itself went: requests to m failed or loaded the old settings again)
    # and keep m serving until the switch (once, a load that waited for room read as failed).
    server = {"memory_budget": "1300MB"}
    d = Daemon(tmp_path, [smol("m"), smol("o")], server=server)
    d.start()
    try:
        c = client_for(d)
        ask(c, "o")
        ask(c, "m")                                            # o is the least recently used
        pid = d.model_status("m")["pid"]
        d.write_config([smol("m", engine={"max_batch_size": 4}), smol("o")], server=server)
        seen = []                                  # m while its replacement loads
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = d.status()
            m = next(x for x in st["models"] if x["name"] == "m")
            if st["loading"]:
                seen.append((m["state"], m["pid"]))
            elif seen or st["config"]["last_error"]:
                break                              # switched, or the replacement was given up
            time.sleep(0.1)
        assert st["config"]["last_error"] is None
        assert seen and set(seen) == {("ready", pid)}
        d.wait_restarted("m", pid)
        assert d.model_status("o")["state"] == "stopped"
        assert ask(c, "m").choices[0].message.content is not None
    finally:
        d.stop()


# -- the state machine and its background tasks, without a model --------------------------

from daemon.config import parse_config                    # noqa: E402
from daemon.lifecycle import budget, handle                # noqa: E402
from daemon.lifecycle.supervisor import Supervisor          # noqa: E402
from daemon.metrics import STATES                           # noqa: E402
from daemon.watch import watch_config                      # noqa: E402

CONFIG = "models: [{name: m, source: embedded:smollm2, preload: false}]\n"


def internal_errors(sup, component: str) -> float:
    return sup.metrics.registry.get_sample_value("mlxd_internal_errors_total", {"component": component})


def test_transitions_are_checked():
    async def main():
        sup = Supervisor(parse_config(CONFIG))
        h = handle.ModelHandle(sup.config.models[0], lambda: sup.config.server, sup.metrics)
        assert set(handle.TRANSITIONS) == set(STATES)
        with pytest.raises(handle.InvalidTransition, match="stopped -> ready"):
            h._transition("ready")
        assert h.state == "stopped"
    asyncio.run(main())


def test_a_failed_background_task_is_logged_and_counted(caplog):
    async def main():
        sup = Supervisor(parse_config(CONFIG))

        async def broken():
            raise RuntimeError("boom")
        sup.spawn(broken())
        await asyncio.sleep(0.05)
        return sup
    with caplog.at_level(logging.ERROR):
        sup = asyncio.run(main())
    assert "background task" in caplog.text and "boom" in caplog.text
    assert internal_errors(sup, "supervisor") == 1


def test_the_idle_reaper_survives_any_exception(monkeypatch, caplog):
    monkeypatch.setattr(budget, "REAP_INTERVAL", 0.01)

    async def main():
        sup = Supervisor(parse_config(CONFIG))
        sup.handles["m"] = None           # not a handle: every pass raises
        reaper = asyncio.create_task(sup.budget.reap_idle())
        await asyncio.sleep(0.2)
        assert not reaper.done()
        reaper.cancel()
        return sup
    with caplog.at_level(logging.ERROR):
        sup = asyncio.run(main())
    assert internal_errors(sup, "reaper") >= 3 and "idle reaper failed" in caplog.text


def test_an_exception_while_applying_a_reload_is_reported_not_raised(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)

    async def main():
        sup = Supervisor(parse_config(CONFIG), config_path=str(path))

        async def broken(new):
            raise KeyError("surprise")
        sup.apply = broken
        return sup, await sup.reload()
    sup, result = asyncio.run(main())
    assert result["applied"] is False and "internal error" in result["error"] and "surprise" in result["error"]
    assert sup.status()["last_error"] == result["error"]
    assert internal_errors(sup, "reload") == 1


def test_the_config_watcher_survives_a_failing_reload(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    calls, errors = [], []

    async def reload():
        calls.append(time.monotonic())
        raise RuntimeError("reload failed")

    async def main():
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_config(path, reload, stop, on_error=lambda: errors.append(1)))
        await asyncio.sleep(0.5)
        for i in range(2):
            path.write_text(CONFIG + f"# edit {i}\n")
            deadline = time.monotonic() + 10
            while len(calls) <= i and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(watcher, 10)
    asyncio.run(main())
    assert len(calls) == 2 and len(errors) == 2


class BadStatsWorker:
    """A worker whose stats replies are malformed and that has been silent for a while."""

    pid = 1

    def __init__(self):
        self.exited = asyncio.get_running_loop().create_future()
        self.last_frame = time.monotonic() - 10
        self.killed = None

    async def call(self, op, timeout):
        return ["not", "a", "dict"]

    async def kill(self, reason=""):
        self.killed = reason
        self.exited.set_result(-9)


def test_stats_polling_survives_a_bad_reply_and_still_detects_a_hang(monkeypatch):
    monkeypatch.setattr(handle, "STATS_INTERVAL", 0.01)

    async def main():
        sup = Supervisor(parse_config("server: {worker_hang_timeout: 1}\n" + CONFIG))
        h = handle.ModelHandle(sup.config.models[0], lambda: sup.config.server, sup.metrics)
        worker = BadStatsWorker()
        hung = await asyncio.wait_for(h._poll_stats(worker), 5)
        return sup, worker, hung
    sup, worker, hung = asyncio.run(main())
    assert "hung" in hung and worker.killed is None       # the owner task kills, not the poller
    assert internal_errors(sup, "poll_stats") >= 1
