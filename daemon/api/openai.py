"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Streaming waits for the worker's first event before sending headers, so a request the
worker refuses (context too long, template error) still gets a proper 4xx, not a 200
stream with an error inside; but no longer than `server.stream_ping_seconds`: a stream
that waits on a model's load, a grammar compile or a held request starts with a
`: keep-alive` comment, and a refusal after it is an error inside the stream. During a
long prefill, SSE comment lines keep proxies and clients from timing out.

The worker's events arrive typed (`daemon/events.py`): text, reasoning, a tool call's start
and its argument deltas, logprobs. They map one to one onto chunk deltas, or are gathered
into one message; nothing here reads model text.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from datetime import datetime, timezone
from typing import AsyncIterator

from quart import Blueprint, Response, current_app, jsonify

from .. import events as ev_
from . import requests as rq
from .errors import APIError, model_not_found
from .schemas import ChatCompletionRequest, CompletionRequest

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


def _payload(body, handle) -> dict:
    s = handle.cfg.sampling
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or s.max_tokens
    payload = {
        "max_tokens": max_tokens,
        "temperature": s.temperature if body.temperature is None else body.temperature,
        "top_p": s.top_p if body.top_p is None else body.top_p,
        "seed": body.seed,
        "stop": body.stop_list(),
    }
    return payload


def _usage(done: ev_.Done) -> dict:
    u = done.usage
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}


async def _complete(kind: str):
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    rq.check_open()
    body = await rq.body(schema)
    handle = rq.model(body.model)
    payload = _payload(body, handle)
    if kind == "chat":
        if problem := body.tool_problem():
            raise APIError(400, problem[1], param=problem[0], code="invalid_value")
        payload["messages"] = body.template_messages()
        payload.update(body.tool_payload())
    else:
        payload["prompt"] = body.prompt
    run = await rq.start(handle, payload, body.cache_salt, stream=body.stream)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    meta = {"id": rid, "created": int(time.time()), "model": handle.name}
    if run.started is not None:
        current_app.logger.debug("request %s on %s: %d prompt tokens, %d cached", rid, handle.name,
                                 run.started.prompt_tokens, run.started.cached_tokens)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(kind, run, meta, include_usage))
    return await _collect(kind, run.events, meta)


def sse_response(chunks) -> Response:
    resp = Response(chunks, mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.timeout = None
    return resp


async def _collect(kind: str, events: AsyncIterator[ev_.Event], meta: dict):
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    logprobs: list[dict] = []
    async with contextlib.aclosing(events):
        async for ev in events:
            if isinstance(ev, ev_.Text):
                text.append(ev.text)
            elif isinstance(ev, ev_.Reasoning):
                reasoning.append(ev.text)
            elif isinstance(ev, ev_.ToolCall):
                calls.append({"id": ev.call_id, "type": "function", "function": {"name": ev.name, "arguments": ""}})
            elif isinstance(ev, ev_.ToolArgs):
                calls[ev.index]["function"]["arguments"] += ev.arguments
            elif isinstance(ev, ev_.Logprob):
                logprobs.append(_logprob(ev))
            elif isinstance(ev, ev_.Done):
                break
    content = "".join(text)
    if kind == "chat":
        message = {"role": "assistant", "content": content or (None if calls else ""), "refusal": None}
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": ev.finish_reason,
                  "logprobs": {"content": logprobs, "refusal": None} if logprobs else None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": ev.finish_reason}
        obj = "text_completion"
    return jsonify({**meta, "object": obj, "choices": [choice], "usage": _usage(ev)})


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _logprob(ev: ev_.Logprob) -> dict:
    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {**entry(ev.token, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top]}


def _chat_delta(ev) -> dict:
    """The chunk delta for one output event; a call's id and name come first, then its arguments."""
    if isinstance(ev, ev_.Text):
        return {"content": ev.text}
    if isinstance(ev, ev_.Reasoning):
        return {"reasoning_content": ev.text, "reasoning": ev.text}
    if isinstance(ev, ev_.ToolCall):
        return {"tool_calls": [{"index": ev.index, "id": ev.call_id, "type": "function",
                                "function": {"name": ev.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]}


_OUTPUT = (ev_.Text, ev_.Reasoning, ev_.ToolCall, ev_.ToolArgs)


async def _stream(kind: str, run: rq.Run, meta: dict, include_usage: bool):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: dict, finish=None, logprobs=None):
        if kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        return _sse({**meta, "object": obj, "choices": [choice]})

    if run.started is None:
        yield b": keep-alive\n\n"            # the worker has not answered yet (a load, a grammar, a queue)
    if kind == "chat":
        yield chunk({"role": "assistant", "content": ""})
    try:
        async for ev in run.events:
            if ev is None:
                yield b": waiting\n\n"
            elif isinstance(ev, _OUTPUT):
                yield chunk(_chat_delta(ev))
            elif isinstance(ev, ev_.Logprob):
                yield chunk({}, logprobs={"content": [_logprob(ev)], "refusal": None})
            elif isinstance(ev, ev_.Progress):
                yield f": prefill {ev.done}/{ev.total}\n\n".encode()
            elif isinstance(ev, ev_.Done):
                yield chunk({}, finish=ev.finish_reason)
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(ev)})
                yield b"data: [DONE]\n\n"
                return
    except APIError as e:
        yield _sse(e.body())


@bp.post("/v1/chat/completions")
async def chat_completions():
    return await _complete("chat")


@bp.post("/v1/completions")
async def completions():
    return await _complete("completion")
