"""A request's worker streams end with its HTTP exchange, however the exchange ends.

A surface's stream is a body generator that reads the run's events, but the client can leave
before that generator runs its first line: Quart cancels the handler while the headers are
being sent, and a generator that never started has nothing to close. Its events (and the
model's slot, and the request running in the worker) were then freed only when the garbage
collector found them, and the disconnect was not counted. So each run's events are held in
the ASGI scope (`hold`), and `with_runs_closed` closes whatever is left of them the moment
the app's ASGI call returns: after the response was sent in full (a no-op then), after a
disconnect at any point, after a write deadline.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

log = logging.getLogger("mlxd")

RUNS_KEY = "mlxd.runs"


def hold(scope: dict, events: AsyncIterator) -> None:
    """Close `events` when this request's exchange ends (closing a finished one does nothing)."""
    scope.setdefault(RUNS_KEY, []).append(events)


def with_runs_closed(asgi_app):
    """`asgi_app`, closing the events `hold` put in each request's scope once the call returns."""

    async def app(scope, receive, send):
        try:
            await asgi_app(scope, receive, send)
        finally:
            for events in scope.pop(RUNS_KEY, ()):
                try:
                    await events.aclose()     # cancels the request in the worker, frees its slot, counts it
                except Exception:
                    log.exception("closing a request's events after %s %s", scope.get("method"), scope.get("path"))

    return app
