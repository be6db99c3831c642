"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Streaming waits for the worker's first event before sending headers, so a request the
worker refuses (context too long, template error) still gets a proper 4xx, not a 200
stream with an error inside. During a long prefill, SSE comment lines keep proxies and
clients from timing out.

The worker's events arrive typed (`daemon/events.py`): text, reasoning, a tool call's start
and its argument deltas, logprobs. They map one to one onto chunk deltas, or are gathered
into one message; nothing here reads model text.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from typing import AsyncIterator

from pydantic import ValidationError
from quart import Blueprint, Response, current_app, g, jsonify, request

from .. import events as ev_
from ..process import RequestTimeout, WorkerGone
from ..lifecycle.handle import ModelAtCapacity, ModelUnavailable
from .errors import APIError, from_validation, model_not_found
from .schemas import ChatCompletionRequest, CompletionRequest

bp = Blueprint("openai", __name__)


def _timeout_error(e: RequestTimeout) -> APIError:
    return APIError(504, f"the request took longer than server.request_timeout ({e.args[0]:g}s) and was cancelled",
                    type_="server_error", code="timeout")


def _supervisor():
    return current_app.config["SUPERVISOR"]


@bp.get("/v1/models")
async def list_models():
    sup = _supervisor()
    data = []
    for h in sup.handles.values():
        created = int(sup.started)
        data.append({"id": h.name, "object": "model", "created": created, "owned_by": "mlxd",
                     "aliases": list(h.cfg.aliases), "state": h.state})
        for alias in h.cfg.aliases:
            data.append({"id": alias, "object": "model", "created": created, "owned_by": "mlxd",
                         "alias_of": h.name, "state": h.state})
    return jsonify({"object": "list", "data": data})


async def _body(schema):
    raw = await request.get_data()
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode()   # lone surrogates cannot reach the worker
    except (ValueError, UnicodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


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


def _worker_error(ev: ev_.Error) -> APIError:
    return APIError(ev.status, ev.message, code=ev.code, param=ev.param)


async def _typed(events: AsyncIterator[dict]) -> AsyncIterator[ev_.Event]:
    async with contextlib.aclosing(events):
        async for ev in events:
            yield ev_.parse(ev)


async def _first_event(events: AsyncIterator[ev_.Event]) -> ev_.Started:
    """The worker's answer to the submit: `started`, or an error raised as APIError."""
    try:
        async for ev in events:
            if isinstance(ev, ev_.Error):
                raise _worker_error(ev)
            if isinstance(ev, ev_.Started):
                return ev
    except WorkerGone as e:
        raise APIError(503, str(e), type_="server_error", code="worker_unavailable") from None
    except ModelAtCapacity as e:
        raise APIError(429, str(e), type_="rate_limit_error", code="model_at_capacity",
                       headers={"Retry-After": "1"}) from None
    except ModelUnavailable as e:
        raise APIError(503, str(e), type_="server_error", code="model_unavailable") from None
    except RequestTimeout as e:
        raise _timeout_error(e) from None
    raise APIError(500, "the worker ended the request without an answer", type_="server_error")


async def _charged(events: AsyncIterator[dict], key: str, limiter) -> AsyncIterator[dict]:
    """The request's tokens charged to its key's rate limit when it ends."""
    async with contextlib.aclosing(events):
        async for ev in events:
            if ev["op"] == "done":
                u = ev["usage"]
                limiter.charge(key, u["prompt_tokens"] + u["completion_tokens"])
            yield ev


def _admit(handle) -> str:
    """429 with Retry-After when the key's rate limit is reached; returns the key."""
    key = g.get("api_key") or request.remote_addr or "-"
    wait = current_app.config["LIMITER"].admit(key)
    if wait > 0:
        raise APIError(429, f"Rate limit reached for this key; retry in {wait:.1f}s.", type_="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait))})
    return key


async def _complete(kind: str):
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    if _supervisor().draining:
        raise APIError(503, "mlxd is shutting down; retry shortly", type_="server_error",
                       code="shutting_down", headers={"Retry-After": "5"})
    body = await _body(schema)
    handle = _supervisor().get(body.model)
    if handle is None:
        raise model_not_found(body.model)
    payload = _payload(body, handle)
    if kind == "chat":
        if problem := body.tool_problem():
            raise APIError(400, problem[1], param=problem[0], code="invalid_value")
        payload["messages"] = body.template_messages()
        payload.update(body.tool_payload())
    else:
        payload["prompt"] = body.prompt
    key = _admit(handle)
    events = _typed(_charged(handle.generate(payload, _supervisor().config.server.request_timeout), key,
                             current_app.config["LIMITER"]))
    try:
        started = await _first_event(events)
    except BaseException:
        await events.aclose()
        raise
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    meta = {"id": rid, "created": int(time.time()), "model": handle.name}
    current_app.logger.debug("request %s on %s: %d prompt tokens, %d cached", rid, handle.name,
                             started.prompt_tokens, started.cached_tokens)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        resp = Response(_stream(kind, events, meta, include_usage), mimetype="text/event-stream")
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"
        resp.timeout = None
        return resp
    return await _collect(kind, events, meta)


async def _collect(kind: str, events: AsyncIterator[ev_.Event], meta: dict):
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    logprobs: list[dict] = []
    async with contextlib.aclosing(events):
        try:
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
                elif isinstance(ev, ev_.Error):
                    raise _worker_error(ev)
                elif isinstance(ev, ev_.Done):
                    break
        except WorkerGone as e:
            raise APIError(503, str(e), type_="server_error", code="worker_died") from None
        except RequestTimeout as e:
            raise _timeout_error(e) from None
    if ev.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled: mlxd is stopping or the model was removed",
                       type_="server_error", code="cancelled")
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


async def _stream(kind: str, events: AsyncIterator[ev_.Event], meta: dict, include_usage: bool):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: dict, finish=None, logprobs=None):
        if kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        return _sse({**meta, "object": obj, "choices": [choice]})

    async with contextlib.aclosing(events):
        if kind == "chat":
            yield chunk({"role": "assistant", "content": ""})
        try:
            async for ev in events:
                if isinstance(ev, _OUTPUT):
                    yield chunk(_chat_delta(ev))
                elif isinstance(ev, ev_.Logprob):
                    yield chunk({}, logprobs={"content": [_logprob(ev)], "refusal": None})
                elif isinstance(ev, ev_.Progress):
                    yield f": prefill {ev.done}/{ev.total}\n\n".encode()
                elif isinstance(ev, ev_.Error):
                    yield _sse(_worker_error(ev).body())
                    return
                elif isinstance(ev, ev_.Done) and ev.finish_reason == "cancelled":
                    yield _sse(APIError(503, "the request was cancelled: mlxd is stopping or the model was "
                                             "removed", type_="server_error", code="cancelled").body())
                    return
                elif isinstance(ev, ev_.Done):
                    yield chunk({}, finish=ev.finish_reason)
                    if include_usage:
                        yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(ev)})
                    yield b"data: [DONE]\n\n"
                    return
        except WorkerGone as e:
            yield _sse(APIError(503, str(e), type_="server_error", code="worker_died").body())
        except RequestTimeout as e:
            yield _sse(_timeout_error(e).body())


@bp.post("/v1/chat/completions")
async def chat_completions():
    return await _complete("chat")


@bp.post("/v1/completions")
async def completions():
    return await _complete("completion")
