"""Model actions for people and scripts: load, unload, pin, unpin.

The console's buttons call these same routes. A model unloaded here loads again on its
next request, like any model that is not preloaded; a runtime pin holds until the
model's config entry changes or the daemon restarts.
"""

from __future__ import annotations

import json

from quart import Blueprint, current_app, jsonify, request

from .errors import APIError, model_not_found

bp = Blueprint("actions", __name__)


async def _handle(name: str):
    """The model named (or aliased) `name`, for a request that carries no body."""
    raw = (await request.get_data()).strip()
    if raw and raw not in (b"{}", b"null"):
        try:
            fields = ", ".join(sorted(json.loads(raw))) or "?"
        except (ValueError, TypeError):
            fields = "a body"
        raise APIError(400, f"This action takes no parameters, got: {fields}.")
    sup = current_app.config["SUPERVISOR"]
    h = sup.get(name)
    if h is None:
        raise model_not_found(name)
    return sup, h


def _reply(h, status: int = 200):
    resp = jsonify({"model": h.name, "state": h.state, "pinned": h.pinned})
    resp.status_code = status
    return resp


@bp.post("/v1/models/<path:name>/load")
async def load(name: str):
    """Starts the worker (making room under the memory budget) and answers at once: 202 while it loads."""
    sup, h = await _handle(name)
    if sup.draining:
        raise APIError(503, "mlxd is shutting down", type_="server_error", code="shutting_down")
    await sup.ensure_loaded(h)
    return _reply(h, 200 if h.state == "ready" else 202)


@bp.post("/v1/models/<path:name>/unload")
async def unload(name: str):
    """Lets in-flight requests finish (up to server.drain_timeout), then ends the worker."""
    sup, h = await _handle(name)
    await h.unload(sup.config.server.drain_timeout)
    return _reply(h)


@bp.post("/v1/models/<path:name>/pin")
async def pin(name: str):
    _, h = await _handle(name)
    h.pin_override = (h.cfg, True)
    return _reply(h)


@bp.post("/v1/models/<path:name>/unpin")
async def unpin(name: str):
    _, h = await _handle(name)
    h.pin_override = (h.cfg, False)
    return _reply(h)
