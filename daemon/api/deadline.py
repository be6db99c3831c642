"""A write deadline per response, so a client that stops reading cannot hold a model's slot.

Hypercorn waits for a connection to drain with no time limit. A stream whose client stops
reading would wait there forever: its generator is never resumed, so its request is never
cancelled and its slot of the model (`ModelHandle.generate`) never freed, whatever
`request_timeout` says. This ASGI wrapper bounds each body chunk's send by
`server.stream_write_timeout`: past it the send is abandoned, Quart closes the response's
generator (which cancels the request in the worker and frees the slot), the connection is
closed, and `on_timeout(model)` counts it. A surface names the request's model in the scope
(`MODEL_KEY`) so the count says whose slot it was.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

log = logging.getLogger("mlxd")

MODEL_KEY = "mlxd.model"


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
                await asyncio.wait_for(send(message), limit)
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
