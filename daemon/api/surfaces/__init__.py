"""API surfaces: each turns its validated body into the worker's payload and the worker's
typed events (`daemon/events.py`) into its wire format; `serve` runs one over the shared
request path (`api/requests.py`).

A surface is one object per request. `payload()` translates in. Out, the driver calls
`opening(run)`, then `feed(ev)` for every event (None: a keep-alive is due), `failed(e)` for
an error inside a stream, and `final()` for the answer as one body, in the same order in both
modes: a stream writes what they yield, a collected request keeps only `final()`, so the two
cannot disagree. Items are bytes, written as they are, or objects the surface's `encode`
writes (a collected request serialises nothing it throws away).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterable, Optional

from quart import Response, current_app, jsonify

from ... import events as ev_
from .. import requests as rq
from ..errors import APIError


class Surface:
    """One request of one API: its translation in and its renderer out."""
    media_type = "text/event-stream"
    # The worker payload's fields as this API spells them, so an error's `param` names what the
    # client sent (the worker knows only its payload)
    params: dict = {}

    def __init__(self, handle, stream: bool, cache_salt: Optional[str] = None):
        self.handle, self.stream, self.cache_salt = handle, stream, cache_salt

    def payload(self) -> dict:
        """The worker's payload for this request (refusing what contradicts itself)."""
        raise NotImplementedError

    def opening(self, run: rq.Run) -> Iterable[Any]:
        """What the answer starts with; `run.started` is None while the worker has not answered."""
        return ()

    def feed(self, ev: Optional[ev_.Event]) -> Iterable[Any]:
        raise NotImplementedError

    def failed(self, e: APIError) -> Iterable[Any]:
        """An error after the stream began, in this API's shape."""
        raise NotImplementedError

    def final(self) -> dict:
        """The answer as one body, once `feed` has seen `done`."""
        raise NotImplementedError

    def encode(self, item: Any) -> bytes:
        raise NotImplementedError

    def finished(self) -> None:
        """The request is over, answered or not."""


def arguments_object(text: str) -> dict:
    """A tool call's streamed JSON arguments as the object Messages and Ollama carry; {} for
    arguments the model left unparsable or not an object (the call still reaches the client)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stream_response(chunks, media_type: str = "text/event-stream") -> Response:
    resp = Response(chunks, mimetype=media_type)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.timeout = None
    return resp


async def serve(surface: Surface):
    """Admit and start the request (a refusal is a response in the surface's shape), then
    stream its events through the surface or collect them into its final body."""
    try:
        run = await rq.start(surface.handle, surface.payload(), surface.cache_salt, stream=surface.stream)
    except APIError as e:
        surface.finished()
        raise _named(surface, e) from None
    except BaseException:
        surface.finished()
        raise
    if run.started is not None:
        current_app.logger.debug("request on %s: %d prompt tokens, %d cached", surface.handle.name,
                                 run.started.prompt_tokens, run.started.cached_tokens)
    if surface.stream:
        return stream_response(_written(surface, run), surface.media_type)
    try:
        return jsonify(await _collected(surface, run))
    except APIError as e:
        raise _named(surface, e) from None
    finally:
        surface.finished()


def _named(surface: Surface, e: APIError) -> APIError:
    e.param = surface.params.get(e.param, e.param)
    return e


async def _collected(surface: Surface, run: rq.Run) -> dict:
    async with contextlib.aclosing(run.events):
        for _ in surface.opening(run):
            pass
        async for ev in run.events:
            for _ in surface.feed(ev):
                pass
            if isinstance(ev, ev_.Done):
                return surface.final()
    raise APIError(500, "the worker ended the request without an answer", type_="server_error")


async def _written(surface: Surface, run: rq.Run):
    def wire(item) -> bytes:
        return item if isinstance(item, bytes) else surface.encode(item)

    try:
        async with contextlib.aclosing(run.events):
            for item in surface.opening(run):
                yield wire(item)
            try:
                async for ev in run.events:
                    for item in surface.feed(ev):
                        yield wire(item)
                    if isinstance(ev, ev_.Done):
                        return
            except APIError as e:
                for item in surface.failed(_named(surface, e)):
                    yield wire(item)
    finally:
        surface.finished()
