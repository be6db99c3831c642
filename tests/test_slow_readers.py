"""Clients that stop reading a stream cannot hold the model's request slots.

A stream's writes wait for the client to take the bytes; one that never reads would keep
its slot (and its place in the batch) for as long as its connection lives. Past
`server.stream_write_timeout` without a chunk taken, the request is cancelled, its slot
freed and the timeout counted in `mlxd_stream_write_timeouts_total{model}`.
"""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import openai
import pytest

from conftest import Daemon, smol, wait_until

SLOTS = {"max_batch_size": 2, "max_waiting": 1}
NON_READERS = 72
DEADLINE = 2.0
# Every chunk names the model: with a long name (and logprobs) each token is ~10 KB on the
# wire, so a non-reader's buffers fill within a few dozen tokens even on a slow, shared CPU.
MODEL = "m-" + "x" * 4000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("slow"), [smol(MODEL, engine=SLOTS, sampling={"temperature": 0.0})],
                server={"stream_write_timeout": DEADLINE}) as d:
        yield d


def metric(d: Daemon, name: str, **labels) -> float:
    text = httpx.get(f"{d.url}/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m[1] == name and ",".join(sorted(m[2].split(","))) == want:
            return float(m[3])
    return 0.0


def non_reader(port: int) -> socket.socket:
    """A client that sends a streaming request with a big answer (logprobs on every token) and
    never reads a byte of it, on a small receive buffer."""
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 4000, "logprobs": True, "top_logprobs": 20,
                       "messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
                       }).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body))
    return s


def test_clients_that_never_read_lose_their_slots_past_the_write_deadline(daemon):
    socks = [non_reader(daemon.port) for _ in range(NON_READERS)]
    try:
        wait_until(lambda: metric(daemon, "mlxd_request_errors_total", model=MODEL, reason="at_capacity") > 0, 120,
                   "the non-readers fill the model's slots")
        c = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
        refused, text, deadline = 0, None, time.monotonic() + 300     # bounds a hang, not a speed
        while text is None:
            assert time.monotonic() < deadline, f"still refused after {refused} tries:\n{daemon.tail()}"
            try:
                stream = c.chat.completions.create(model=MODEL, stream=True, max_tokens=8,
                                                   messages=[{"role": "user", "content": "Say hi."}])
                text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            except openai.RateLimitError:
                refused += 1
                time.sleep(0.25)
        assert text
        # Every non-reader the model admitted was cut off at the deadline, and only those.
        turned_away = metric(daemon, "mlxd_request_errors_total", model=MODEL, reason="at_capacity") - refused
        admitted = NON_READERS - turned_away
        assert admitted >= SLOTS["max_batch_size"] + SLOTS["max_waiting"]
        wait_until(lambda: metric(daemon, "mlxd_stream_write_timeouts_total", model=MODEL) == admitted, 120,
                   lambda: f"{metric(daemon, 'mlxd_stream_write_timeouts_total', model=MODEL)} timeouts, {admitted} admitted")
        wait_until(lambda: daemon.model_status(MODEL)["requests_in_flight"] == 0, 60, "the slots are free")
    finally:
        for s in socks:
            s.close()
