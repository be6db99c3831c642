"""The web console: one static page at `/` and `/ui/`, fed by one SSE stream.

The page and its assets are public (they hold no data) so that it can ask for a key;
`/ui/events` carries the daemon's state and sits behind the API keys like every other
route. It is read with fetch(), not EventSource, so the key travels as a bearer header.
A snapshot goes out each second while something changes, else every few seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from quart import Blueprint, Response, current_app

from ..errors import APIError
from .view import snapshot

bp = Blueprint("console", __name__)

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
TICK, IDLE_EVERY = 1.0, 5.0
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def is_public(path: str) -> bool:
    """The page and its assets: no daemon state in them, so no key needed to fetch them."""
    return path in ("/", "/ui", "/ui/") or path.startswith("/ui/static/")


def _enabled() -> None:
    if not current_app.config["SUPERVISOR"].config.server.console:
        raise APIError(404, "The web console is turned off (server.console: false).", type_="not_found_error")


def _file(name: str) -> Response:
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or path.suffix not in TYPES or not path.is_file():
        raise APIError(404, f"No console file {name!r}.", type_="not_found_error")
    return Response(path.read_bytes(), content_type=TYPES[path.suffix], headers=HEADERS)


@bp.get("/")
@bp.get("/ui")
@bp.get("/ui/")
async def page():
    _enabled()
    return _file("index.html")


@bp.get("/ui/static/<name>")
async def static_file(name: str):
    _enabled()
    return _file(name)


@bp.get("/ui/events")
async def events():
    _enabled()
    sup = current_app.config["SUPERVISOR"]

    async def stream():
        last, sent = None, 0.0
        while not sup.draining:
            state = json.dumps(snapshot(sup), separators=(",", ":"), default=str)
            now = time.monotonic()
            if state != last or now - sent >= IDLE_EVERY:
                yield f'data: {{"now":{time.time():.3f},"state":{state}}}\n\n'.encode()
                last, sent = state, now
            await asyncio.sleep(TICK)

    resp = Response(stream(), mimetype="text/event-stream", headers={**HEADERS, "X-Accel-Buffering": "no"})
    resp.timeout = None
    return resp
