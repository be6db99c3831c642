"""Prefix-cache routes: per-model stats, and clearing one model's cache."""

from __future__ import annotations

import asyncio

from quart import Blueprint, current_app, jsonify, request

from ..lifecycle.handle import ModelUnavailable
from ..process import WorkerGone
from .errors import APIError, model_not_found

bp = Blueprint("cache", __name__)


async def _ask(handle, op: str) -> dict:
    try:
        return await handle.call(op, timeout=30)
    except ModelUnavailable:
        return {"state": handle.state}
    except (WorkerGone, asyncio.TimeoutError) as e:
        return {"state": handle.state, "error": str(e) or "timeout"}


@bp.get("/v1/cache/stats")
async def cache_stats():
    sup = current_app.config["SUPERVISOR"]
    handles = list(sup.handles.values())
    replies = await asyncio.gather(*(_ask(h, "stats") for h in handles))
    return jsonify({"models": {h.name: r.get("cache", r) for h, r in zip(handles, replies)}})


@bp.delete("/v1/cache")
async def cache_clear():
    sup = current_app.config["SUPERVISOR"]
    name = request.args.get("model")
    if not name:
        raise APIError(400, "Name the model whose cache to clear: DELETE /v1/cache?model=NAME", param="model")
    handle = sup.get(name)
    if handle is None:
        raise model_not_found(name)
    reply = await _ask(handle, "cache_clear")
    if "entries" not in reply:
        raise APIError(503, f"model {handle.name!r} is not ready ({handle.state})", type_="server_error")
    return jsonify({"model": handle.name, "cleared_entries": reply["entries"]})
