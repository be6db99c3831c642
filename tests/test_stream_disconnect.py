"""A client that leaves a stream at any point frees its request at once, and is counted once.

The real app (routes, request path, ModelHandle, Supervisor) is driven over ASGI, as Hypercorn
drives it, by a client that disconnects at a chosen message: while the headers go out (the
body generator never starts), or at the first body chunk. The worker is the lifecycle's test
double (tests/fake_worker.py), whose request stays running until it is cancelled. The checks
run the moment the app's ASGI call returns, with the cyclic garbage collector off: a request
freed later, by an async generator's finalizer or the collector, fails them (it did: at the
headers, the stream's events were never closed; at a body chunk, the console's record of the
request was left to its finalizer, which alone cancelled it in the worker).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys

import pytest

from daemon.api.app import create_app
from daemon.config import parse_config
from daemon.lifecycle.supervisor import Supervisor
from fake_worker import Farm, until

CONFIG = "server: {stream_ping_seconds: 0.02}\nmodels: [{name: m, source: embedded:smollm2, preload: true}]\n"
BODIES = {
    "/v1/chat/completions": {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "m", "stream": True, "prompt": "hi"},
    "/v1/messages": {"model": "m", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"model": "m", "stream": True, "input": "hi"},
}


async def leave_at(app, path: str, message: str, nth: int, blocks: bool) -> list[dict]:
    """POST `path`, and disconnect when the app sends its `nth` message of type `message`.
    That send then never completes (`blocks`: the client stopped reading first) or completes
    at once, as the disconnect arrives; every later send returns at once, as Hypercorn's do
    into a closed stream (the bytes are dropped, no error). Returns what was sent."""
    gone = False
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": json.dumps(BODIES[path]).encode(), "more_body": False})
    sent: list[dict] = []

    async def send(msg):
        nonlocal gone
        sent.append(msg)
        if not gone and msg["type"] == message and sum(m["type"] == message for m in sent) == nth:
            gone = True
            inbox.put_nowait({"type": "http.disconnect"})
            if blocks:
                await asyncio.Event().wait()
        if gone:
            await asyncio.sleep(0)        # Hypercorn's write into a closed transport: one turn of the loop

    scope = {"type": "http", "http_version": "1.1", "asgi": {"version": "3.0"}, "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "extensions": {}}
    await asyncio.wait_for(app(scope, inbox.get, send), 10)
    return sent


def cancelled(sup) -> float:
    return sup.metrics.registry.get_sample_value("mlxd_request_errors_total", {"model": "m", "reason": "cancelled"}) or 0.0


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("message,nth,blocks", [("http.response.start", 1, True), ("http.response.body", 1, True),
                                                ("http.response.body", 2, True), ("http.response.body", 2, False)])
def test_a_client_gone_at_any_message_frees_its_request_at_once(path, message, nth, blocks):
    async def main():
        # An async generator left unfinished is recorded instead of closed by a scheduled task:
        # the stream's events must be closed by the code that owns them, not found later.
        left = []
        sys.set_asyncgen_hooks(finalizer=lambda agen: left.append(agen.__qualname__))
        farm = Farm(auto_ready=True, answer_at_once=False)     # a request runs until it is cancelled
        sup = Supervisor(parse_config(CONFIG), spawn=farm.spawn)
        await sup.start()
        await until(lambda: sup.get("m").state == "ready")
        app = create_app(sup, host="127.0.0.1", port=8000)
        worker, handle = farm.workers[0], sup.get("m")
        try:
            for i in range(1, 4):
                sent = await leave_at(app, path, message, nth, blocks)
                assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200, sent[0]
                # No yield to the loop since the app returned: nothing left to a finalizer.
                assert worker.in_flight == 0 and handle.requests == 0, (worker.in_flight, handle.requests)
                assert cancelled(sup) == i
                assert not left, f"left to the finalizer: {left}"
        finally:
            await sup.stop()

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
