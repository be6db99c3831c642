"""Graceful stop: SIGTERM lets in-flight requests finish, flushes the cache, exits 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from openai import OpenAI

from conftest import Daemon, smol

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def test_sigterm_finishes_streams_flushes_cache_and_exits_zero(tmp_path):
    d = Daemon(tmp_path, [smol("m", sampling={"temperature": 0.0})], server={"shutdown_timeout": 60})
    d.start()
    client = OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="m", max_tokens=48, stream=True, messages=STORY,
                                            stream_options={"include_usage": True})
    chunks = [next(iter(stream))]
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(f"{d.url}/v1/chat/completions", json={"model": "m", "messages": STORY}, timeout=10)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "shutting_down"
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 48           # the stream completed
    assert d.proc.wait(60) == 0
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
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    error = None
    try:
        for _ in stream:
            pass
    except Exception as e:
        error = e
    assert error is not None and "cancelled" in str(error)
    assert d.proc.wait(60) == 0
    assert time.monotonic() - t0 < 30


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
    time.sleep(2)
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) != 0
