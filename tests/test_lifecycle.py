"""Model lifecycle: on-demand loads (single-flight), idle TTL, pinning, the memory budget."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, smol

HI = [{"role": "user", "content": "Hi"}]


def client_for(d: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=300)


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
        ask(c, "one")                                          # and back: two makes room
        assert wait_state(d, "two", "stopped", timeout=30)
        st = d.model_status("one")
        assert st["state"] == "ready" and st["workers_started"] == 2
        # each load on demand is timed: status has the last, /metrics counts every one
        assert 0 < st["start_seconds"] < 120
        loads = {s.labels["model"]: s.value for f in text_string_to_metric_families(httpx.get(f"{d.url}/metrics").text)
                 for s in f.samples if s.name == "mlxd_worker_start_seconds_count"}
        assert loads == {"one": 2, "two": 1}
    finally:
        d.stop()


def test_a_model_that_cannot_load_fails_fast_and_others_serve(tmp_path):
    d = start_unready(Daemon(tmp_path, [smol("ok"), {"name": "broken", "source": str(tmp_path / "absent.gguf")}]))
    try:
        wait_state(d, "ok", "ready", timeout=120)
        st = wait_state(d, "broken", "failed", timeout=120)
        assert "ModelSourceError" in st["last_error"] and "absent.gguf" in st["last_error"]
        assert st["restarts"] >= 4
        c = client_for(d)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            ask(c, "broken")
        assert e.value.status_code == 503 and "absent.gguf" in e.value.message
        assert time.monotonic() - t0 < 5
        assert ask(c, "ok").choices[0].message.content is not None
    finally:
        d.stop()
