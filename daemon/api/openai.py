"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Streaming waits for the worker's first event before sending headers, so a request the
worker refuses (context too long, template error) still gets a proper 4xx, not a 200
stream with an error inside; but no longer than `server.stream_ping_seconds`: a stream
that waits on a model's load, a grammar compile or a held request starts with a
`: keep-alive` comment, and a refusal after it is an error inside the stream. During a
long prefill, SSE comment lines keep proxies and clients from timing out.

Translating the body and rendering the worker's typed events is `surfaces/chat.py`'s job;
this module routes and lists the models.
"""

from __future__ import annotations

from datetime import datetime, timezone

from quart import Blueprint, jsonify

from . import requests as rq
from .errors import model_not_found
from .schemas import ChatCompletionRequest, CompletionRequest
from .surfaces import serve
from .surfaces.chat import Chat

bp = Blueprint("openai", __name__)


def _model_entry(id_: str, created: int, **extra) -> dict:
    """One model, in a shape both SDKs read: OpenAI's `object`/`owned_by`, Anthropic's `type`/`display_name`."""
    return {"id": id_, "object": "model", "created": created, "owned_by": "mlxd", "type": "model",
            "display_name": id_, "created_at": datetime.fromtimestamp(created, timezone.utc).isoformat(), **extra}


def _models() -> list[dict]:
    sup = rq.supervisor()
    data = []
    for h in sup.handles.values():
        created = int(sup.started)
        data.append(_model_entry(h.name, created, aliases=list(h.cfg.aliases), state=h.state))
        for alias in h.cfg.aliases:
            data.append(_model_entry(alias, created, alias_of=h.name, state=h.state))
    return data


@bp.get("/v1/models/<path:name>")
async def get_model(name: str):
    entry = next((m for m in _models() if m["id"] == name), None)
    if entry is None:
        raise model_not_found(name)
    return jsonify(entry)


@bp.get("/v1/models")
async def list_models():
    data = _models()
    return jsonify({"object": "list", "data": data, "has_more": False,
                    "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


@bp.post("/v1/chat/completions")
async def chat_completions():
    rq.check_open()
    body = await rq.body(ChatCompletionRequest)
    return await serve(Chat(body, rq.model(body.model), "chat"))


@bp.post("/v1/completions")
async def completions():
    rq.check_open()
    body = await rq.body(CompletionRequest)
    return await serve(Chat(body, rq.model(body.model), "completion"))
