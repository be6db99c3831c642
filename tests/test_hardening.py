"""Hardening: auth, backpressure, limits, disconnects and injected faults, for real."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import Daemon, smol, wait_until

HI = [{"role": "user", "content": "Hi"}]
STORY = [{"role": "user", "content": "Write a long story about the sea."}]
KEY, ENV_KEY = "sk-literal-test-key", "sk-from-the-environment"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    os.environ["MLXD_TEST_KEY"] = ENV_KEY
    d = Daemon(tmp_path_factory.mktemp("keyed"), [smol("m", sampling={"max_tokens": 4})],
               server={"auth": {"api_keys": [KEY, "${env:MLXD_TEST_KEY}"]}, "max_body_bytes": 4096,
                       "rate_limit": {"requests_per_minute": 1000}}, api_key=KEY)
    d.start()
    yield d
    d.stop()


ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"model": "m", "messages": HI}),
          ("POST", "/v1/completions", {"model": "m", "prompt": "Hi"}), ("GET", "/v1/status", None),
          ("GET", "/v1/cache/stats", None), ("DELETE", "/v1/cache?model=m", None), ("POST", "/admin/reload", None)]


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_every_route_needs_a_key(keyed, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"}):
        r = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, headers, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    for key in (KEY, ENV_KEY):
        r = httpx.request(method, keyed.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, (path, r.text)


def test_health_and_metrics_stay_open(keyed):
    assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{keyed.url}/metrics", timeout=10).status_code == 200


def test_official_client_with_a_key(keyed):
    ok = OpenAI(base_url=f"{keyed.url}/v1", api_key=ENV_KEY, max_retries=0)
    assert ok.chat.completions.create(model="m", messages=HI).choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()


def test_body_size_limit_is_413(keyed):
    r = httpx.post(f"{keyed.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "messages": [{"role": "user", "content": "x" * 10_000}]}, timeout=30)
    assert r.status_code == 413 and "message" in r.json()["error"]


def test_missing_env_key_is_a_config_error(tmp_path):
    from daemon.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match="environment variable MLXD_NOT_SET is not set"):
        parse_config("server:\n  auth:\n    api_keys: ['${env:MLXD_NOT_SET}']\nmodels: [{name: a, source: x}]\n")


TIGHT_KEYS = ("sk-burst", "sk-limited", "sk-other")     # one bucket each: the tests cannot share one


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("tight"), [
        smol("tiny", engine={"max_batch_size": 1, "max_waiting": 1}, sampling={"max_tokens": 48},
             prefix_cache={"enabled": False}),
        smol("limited", sampling={"max_tokens": 2}, prefix_cache={"enabled": False})],
        server={"rate_limit": {"requests_per_minute": 3}, "request_timeout": 60,
                "auth": {"api_keys": list(TIGHT_KEYS)}}, api_key=TIGHT_KEYS[0])
    d.start()
    yield d
    d.stop()


def test_burst_beyond_the_queue_gets_429_and_every_request_is_accounted_for(tight):
    c = OpenAI(base_url=f"{tight.url}/v1", api_key="sk-burst", max_retries=0, timeout=120)
    outcomes, lock = [], threading.Lock()

    def one():
        try:
            r = c.chat.completions.create(model="tiny", messages=STORY)
            res = ("ok", r.usage.completion_tokens)
        except openai.RateLimitError as e:
            res = ("429", e.response.headers.get("Retry-After"), e.body["code"])
        except Exception as e:
            res = ("other", repr(e))
        with lock:
            outcomes.append(res)

    threads = [threading.Thread(target=one) for _ in range(3)]  # 3 of the rate limit's 3 per minute
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    kinds = [o[0] for o in outcomes]
    assert len(outcomes) == 3 and "other" not in kinds, outcomes
    assert kinds.count("429") >= 1 and kinds.count("ok") >= 1
    assert all(o[1] and o[2] == "model_at_capacity" for o in outcomes if o[0] == "429")


def test_rate_limit_per_key_says_when_to_retry(tight):
    c = OpenAI(base_url=f"{tight.url}/v1", api_key="sk-limited", max_retries=0, timeout=120)
    for _ in range(3):                                   # the key's 3 a minute, all admitted
        assert c.chat.completions.create(model="limited", messages=HI).choices[0].message.content is not None
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="limited", messages=HI)
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(e.value.response.headers["Retry-After"]) <= 20     # one request back in 60/3 s
    other = OpenAI(base_url=f"{tight.url}/v1", api_key="sk-other", max_retries=0, timeout=120)
    assert other.chat.completions.create(model="limited", messages=HI).choices    # per key, not global


def test_fifty_clients_disconnecting_free_everything(tmp_path):
    # Every stream must still be running when its client leaves, so that each of the 50 is a
    # cancellation: the waiting ones open within 0.2 s (a keep-alive), none can reach 2000 tokens.
    d = Daemon(tmp_path, [smol("m", sampling={"max_tokens": 2000}, prefix_cache={"enabled": False})],
               server={"stream_ping_seconds": 0.2})
    d.start()
    try:
        c = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=120)
        c.chat.completions.create(model="m", messages=HI, max_tokens=4)
        time.sleep(2.5)
        baseline = d.model_status("m")["memory_bytes"]
        generated = d.model_status("m")["tokens"]["generated"]     # counted as requests finish
        started = threading.Barrier(51)

        def client():
            with httpx.stream("POST", f"{d.url}/v1/chat/completions", timeout=120,
                              json={"model": "m", "messages": STORY, "stream": True}) as r:
                next(r.iter_lines())               # the stream is open and admitted
                started.wait(120)
                                                   # leaving the block closes the connection
        threads = [threading.Thread(target=client) for _ in range(50)]
        for t in threads:
            t.start()
        started.wait(120)
        for t in threads:
            t.join(60)

        def settled():
            st = d.model_status("m")
            return st if st["requests_in_flight"] == 0 and st["requests_running"] == 0 \
                and st["requests_waiting"] == 0 else None
        st = wait_until(settled, 30, lambda: f"no request left running or waiting: {d.model_status('m')}")
        assert st["memory_bytes"] <= baseline * 1.05 + 16 * 2**20
        def errors() -> str:
            return "\n".join(line for line in httpx.get(f"{d.url}/metrics", timeout=10).text.splitlines()
                             if line.startswith("mlxd_request_errors_total"))
        # Every disconnect is counted exactly once, and by the time the worker's request is gone:
        # closing a request's events cancels it in the worker and counts it in one step.
        assert 'mlxd_request_errors_total{model="m",reason="cancelled"} 50.0' in errors(), errors()
        assert d.model_status("m")["tokens"]["generated"] == generated, "a stream finished before its client left"
    finally:
        d.stop()


def test_hung_worker_is_restarted_and_others_do_not_notice(tmp_path):
    d = Daemon(tmp_path, [smol("frozen"), smol("fine", sampling={"max_tokens": 3})],
               server={"worker_hang_timeout": 3})
    d.start()
    try:
        pid = d.model_status("frozen")["pid"]
        os.kill(pid, signal.SIGSTOP)
        c = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=120)
        assert c.chat.completions.create(model="fine", messages=HI).choices[0].message.content is not None
        st = d.wait_restarted("frozen", pid, timeout=60)
        assert "hung" in (st["last_error"] or "")
        assert c.chat.completions.create(model="frozen", messages=HI, max_tokens=3).choices[0].message.content
    finally:
        d.stop()


def mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_drops_entries_and_serving_goes_on(tmp_path):
    prefix = tmp_path / "cache" / "prefix"
    if not mount_tmpfs(prefix, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    d = Daemon(tmp_path, [smol("m", sampling={"max_tokens": 4, "temperature": 0.0})])
    try:
        d.start()
        c = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=120)
        long = [{"role": "user", "content": "Explain: " + "the quick brown fox jumps over the lazy dog " * 12}]
        for i in range(3):
            assert c.chat.completions.create(model="m", messages=long).choices[0].message.content is not None
        stats = wait_until(lambda: (s := httpx.get(f"{d.url}/v1/cache/stats", timeout=10).json()["models"]["m"])
                           ["disk"]["pending_writes"] == 0 and s, 30, "writes settled")
        assert stats["disk"]["write_errors"] >= 1
        assert not list(prefix.glob("*/*.tmp*")), "no partial file left behind"
        for f in prefix.glob("*/*.json"):      # whatever did fit is whole
            assert (f.with_suffix(".safetensors")).exists()
        wait_until(lambda: 'mlxd_prefix_cache_disk_errors_total{model="m"}' in (t := httpx.get(
            f"{d.url}/metrics", timeout=10).text) and "disk_errors_total{model=\"m\"} 0.0" not in t, 10, "metric")
    finally:
        d.stop()
        subprocess.run(["umount", str(prefix)])


def test_unusable_cache_directory_turns_the_disk_tier_off(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "prefix").write_text("not a directory")
    d = Daemon(tmp_path, [smol("m", sampling={"max_tokens": 4})])
    d.start()
    try:
        c = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=120)
        assert c.chat.completions.create(model="m", messages=HI).choices[0].message.content is not None
        second = c.chat.completions.create(model="m", messages=HI)
        assert second.usage.prompt_tokens_details.cached_tokens > 0       # the memory tier still works
        stats = httpx.get(f"{d.url}/v1/cache/stats", timeout=10).json()["models"]["m"]
        assert stats["disk"]["usable"] is False
        assert "disk tier is off" in d.tail(20000)
    finally:
        d.stop()
