"""A write deadline per response, so a client that stops reading cannot hold a model's slot.

Hypercorn waits for a connection to drain with no time limit. A stream whose client stops
reading would wait there forever: its generator is never resumed, so its request is never
cancelled and its slot of the model (`ModelHandle.generate`) never freed, whatever
`request_timeout` says. This ASGI wrapper bounds each body chunk's send by
`server.stream_write_timeout`: past it the send is abandoned, Quart closes the response's
generator (which cancels the request in the worker and frees the slot), the connection is
closed, and `on_timeout(model)` counts it. A surface names the request's model in the scope
(`MODEL_KEY`) so the count says whose slot it was.

The bound is `asyncio.timeout`, in the handler's own task, not `asyncio.wait_for`: on Python
3.11 wait_for returns the send's result when the send finishes in the same turn of the loop
as a cancellation arrives, and drops the cancellation. Quart cancels a handler once, when its
client disconnects, and Hypercorn's sends into a closed connection succeed silently, so such
a handler went on streaming its request to nobody until the request ended (never counted as
cancelled, its slot held meanwhile: 6 of 50 disconnects in tests/test_hardening.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable, Optional

log = logging.getLogger("mlxd")

MODEL_KEY = "mlxd.model"


@contextlib.asynccontextmanager
async def _timeout_310(limit: float):
    """Python 3.10 has no asyncio.timeout: a timer that cancels the task, told apart from
    any other cancellation by the flag it sets."""
    task, expired = asyncio.current_task(), []
    handle = asyncio.get_running_loop().call_later(limit, lambda: (expired.append(1), task.cancel()))
    try:
        yield
    except asyncio.CancelledError:
        if expired:
            raise asyncio.TimeoutError() from None
        raise
    finally:
        handle.cancel()


_timeout = getattr(asyncio, "timeout", _timeout_310)


class WriteTimeout(Exception):
    """The client took nothing within the deadline (not a TimeoutError: Quart swallows those)."""


def with_write_deadline(asgi_app, timeout: Callable[[], Optional[float]], on_timeout: Callable[[str], None]):
    """`asgi_app` with every response body send bounded by `timeout()` seconds (None: unbounded)."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return await asgi_app(scope, receive, send)

        async def bounded(message):
            limit = timeout()
            if message["type"] != "http.response.body" or limit is None:
                return await send(message)
            try:
                async with _timeout(limit):
                    await send(message)
            except asyncio.TimeoutError:
                raise WriteTimeout() from None

        try:
            await asgi_app(scope, receive, bounded)
        except WriteTimeout:
            model = scope.get(MODEL_KEY, "")
            log.warning("%s %s%s: the client took nothing for %.0fs; the response is cut off%s",
                        scope["method"], scope["path"], f" ({model})" if model else "", timeout(),
                        " and its request cancelled" if model else "")
            on_timeout(model)

    return app
