"""Graceful stop: SIGTERM lets in-flight requests finish, flushes the cache, exits 0."""

from __future__ import annotations

import signal
import threading

import httpx
from openai import OpenAI

from conftest import Daemon, in_order, smol, wait_until

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def test_sigterm_finishes_streams_flushes_cache_and_exits_zero(tmp_path):
    # A deadline far past what 48 tokens take, even on a loaded machine: only a hang reaches it.
    d = Daemon(tmp_path, [smol("m", sampling={"temperature": 0.0})], server={"shutdown_timeout": 300})
    d.start()
    client = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=600)
    stream = client.chat.completions.create(model="m", max_tokens=48, stream=True, messages=STORY,
                                            stream_options={"include_usage": True})
    chunks = [next(iter(stream))]
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "waiting up to 300s for 1 in flight" in d.tail(), 60, "the stop begun")
    refused = httpx.post(f"{d.url}/v1/chat/completions", json={"model": "m", "messages": STORY}, timeout=10)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "shutting_down"
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 48           # the stream completed
    assert d.proc.wait(300) == 0
    assert "deadline reached" not in d.tail(10**7)
    entries = list((d.cache_dir / "prefix").glob("*/*.json"))
    assert entries, "the finished request's cache was flushed to disk"

    d.start()
    r = client.chat.completions.create(model="m", max_tokens=4, messages=STORY)
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    d.stop()


def test_deadline_cancels_what_is_left_with_a_clean_error(tmp_path):
    d = Daemon(tmp_path, [smol("m", sampling={"temperature": 0.0})], server={"shutdown_timeout": 1})
    d.start()
    client = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="m", max_tokens=2000, stream=True, messages=STORY)
    next(iter(stream))
    before = len(d.log_path.read_text(errors="replace"))
    d.proc.send_signal(signal.SIGTERM)
    error = None
    try:
        for _ in stream:
            pass
    except Exception as e:
        error = e
    assert error is not None and "cancelled" in str(error)
    assert d.proc.wait(300) == 0
    log = d.log_path.read_text(errors="replace")[before:]
    assert in_order(log, "waiting up to 1s for 1 in flight", "deadline reached; cancelling 1 request(s)")


def test_second_signal_exits_at_once(tmp_path):
    d = Daemon(tmp_path, [smol("m")], server={"shutdown_timeout": 120})
    d.start()
    client = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=120)
    def long_stream():
        try:
            list(client.chat.completions.create(model="m", max_tokens=2000, stream=True, messages=STORY))
        except Exception:
            pass        # cut by the hard exit: expected

    threading.Thread(target=long_stream, daemon=True).start()
    wait_until(lambda: d.model_status("m")["requests_in_flight"] == 1, 120, "the stream in flight")
    before = len(d.log_path.read_text(errors="replace"))
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "waiting up to 120s for 1 in flight" in d.tail(), 60, "the graceful stop begun")
    d.proc.send_signal(signal.SIGTERM)
    # 1, not the graceful stop's 0: the second signal did not wait for the stream (120 s of grace)
    assert d.proc.wait(300) == 1
    log = d.log_path.read_text(errors="replace")[before:]
    assert in_order(log, "waiting up to 120s for 1 in flight", "second signal: exiting now")
    assert "deadline reached" not in log
