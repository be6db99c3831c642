"""The request path every API surface shares: body, model, admission, the worker's events.

A surface translates its request into the worker's payload (`start`), then reads typed
events (`daemon/events.py`) and writes them in its own wire format. Failures arrive as
`APIError` records, whichever step they come from (rate limit, a full or missing model,
the worker refusing the prompt or dying, the request timeout), and each surface renders
them in its own shape, in a response or inside a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from pydantic import ValidationError
from quart import current_app, g, request

from .. import events as ev_
from ..process import RequestTimeout, WorkerGone
from ..lifecycle.handle import ModelAtCapacity, ModelUnavailable
from .deadline import MODEL_KEY
from .lifetime import hold
from .errors import APIError, from_validation, model_not_found


def supervisor():
    return current_app.config["SUPERVISOR"]


async def body(schema):
    """The request's JSON body validated by `schema`; a 400 naming the field otherwise."""
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


def check_open() -> None:
    """503 while the daemon drains, before the body is read."""
    if supervisor().draining:
        raise APIError(503, "mlxd is shutting down; retry shortly", type_="server_error",
                       code="shutting_down", headers={"Retry-After": "5"})


def model(name: str):
    """The model's handle; 404 for a name no model answers to."""
    check_open()
    handle = supervisor().get(name)
    if handle is None:
        raise model_not_found(name)
    return handle


def noise_prefixes() -> tuple[str, ...]:
    return tuple(supervisor().config.server.drop_system_prefixes)


def drop_noise(text: str, prefixes: tuple[str, ...]) -> str:
    """Text without the lines that start with one of `prefixes` (server.drop_system_prefixes).

    Agents put a session id at the top of the system prompt; left in, no new session could
    reuse the cached system prompt and tools."""
    if not prefixes:
        return text
    lines = text.split("\n")
    kept = [ln for ln in lines if not ln.lstrip().startswith(prefixes)]
    return text if len(kept) == len(lines) else "\n".join(kept).lstrip("\n")


def timeout_error(e: RequestTimeout) -> APIError:
    return APIError(504, f"the request took longer than server.request_timeout ({e.args[0]:g}s) and was cancelled",
                    type_="server_error", code="timeout")


def worker_error(ev: ev_.Error) -> APIError:
    return APIError(ev.status, ev.message, type_="server_error" if ev.status >= 500 else "invalid_request_error",
                    code=ev.code, param=ev.param)


CANCELLED = ("the request was cancelled: mlxd is stopping or the model was removed", "cancelled")


def _admit() -> str:
    """429 with Retry-After when the key's rate limit is reached; returns the key."""
    key = g.get("api_key") or request.remote_addr or "-"
    wait = current_app.config["LIMITER"].admit(key)
    if wait > 0:
        raise APIError(429, f"Rate limit reached for this key; retry in {wait:.1f}s.", type_="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait))})
    return key


async def _charged(events: AsyncIterator[dict], key: str, limiter) -> AsyncIterator[dict]:
    """The request's tokens charged to its key's rate limit when it ends."""
    async with contextlib.aclosing(events):
        async for ev in events:
            if ev["op"] == "done":
                u = ev["usage"]
                limiter.charge(key, u["prompt_tokens"] + u["completion_tokens"])
            yield ev


async def _typed(events: AsyncIterator[dict]) -> AsyncIterator[ev_.Event]:
    """Typed events until `done`; every failure raised as APIError (the worker's error events too)."""
    started = False
    async with contextlib.aclosing(events):
        try:
            async for raw in events:
                ev = ev_.parse(raw)
                if isinstance(ev, ev_.Error):
                    raise worker_error(ev)
                if isinstance(ev, ev_.Done) and ev.finish_reason == "cancelled":
                    raise APIError(503, CANCELLED[0], type_="server_error", code=CANCELLED[1])
                started = True
                yield ev
        except WorkerGone as e:
            raise APIError(503, str(e), type_="server_error",
                           code="worker_died" if started else "worker_unavailable") from None
        except ModelAtCapacity as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="model_at_capacity",
                           headers={"Retry-After": "1"}) from None
        except ModelUnavailable as e:
            raise APIError(503, str(e), type_="server_error", code="model_unavailable") from None
        except RequestTimeout as e:
            raise timeout_error(e) from None


@dataclass
class Run:
    """An admitted request: the worker's `started` event and the events after it. A stream
    whose `started` did not come within `server.stream_ping_seconds` (the model loads, a
    grammar compiles, the request is held) has `started` None and begins at once: the
    `Started` event comes later among its events, and a refusal as an error inside it.
    A stream's events carry None for each keep-alive due."""
    handle: object
    started: Optional[ev_.Started]
    events: AsyncIterator[Optional[ev_.Event]]


def check_serves(handle, wants: str) -> None:
    """A chat request to an embedding model, or the reverse: a 400 before anything loads, when the
    model's kind is known (its entry's `kind`, or its last worker's); the worker refuses it too."""
    serves = handle.serves
    if serves is None or serves == wants:
        return
    if serves == "embedding":
        msg = (f"model '{handle.name}' is an embedding model: it serves /v1/embeddings and Ollama's /api/embed, "
               "not text generation")
    else:
        msg = (f"model '{handle.name}' is a language model, not an embedding model: embeddings need a model "
               "entry with kind: embedding (or a sentence-transformers directory)")
    raise APIError(400, msg, code="model_not_supported", param="model")


def key_identity(key: Optional[str] = None) -> str:
    """The caller's API key as an owner of per-client state (a hash, never the key); "" without keys."""
    key = g.get("api_key") if key is None else key
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


def cache_namespace(handle, salt: Optional[str]) -> str:
    """The request's prefix cache namespace: its API key's (unless the model shares across
    keys) and its `cache_salt`'s; "" for neither. A hash, never the key: it travels to the
    worker and seeds the cache's hashes, which go to disk."""
    key = None if handle.cfg.prefix_cache.share_across_keys else g.get("api_key")
    if not key and salt is None:
        return ""
    key_id = key_identity(key) if key else None
    return hashlib.blake2b(json.dumps([key_id, salt]).encode(), digest_size=16, person=b"mlxd-cache-ns").hexdigest()


async def start(handle, payload: dict, cache_salt: Optional[str] = None, stream: bool = False) -> Run:
    """Admit the request, submit it, and wait for the worker's answer, so that a refused
    prompt is a proper 4xx before any stream begins, unless a stream would wait for longer
    than a keep-alive's period: then its headers go now, so proxies do not drop it."""
    check_serves(handle, "embedding" if "embed" in payload else "chat")
    key = _admit()
    request.scope[MODEL_KEY] = handle.name       # a write timeout is counted for this model
    if "embed" not in payload and (ns := cache_namespace(handle, cache_salt)):     # embeddings cache nothing
        payload = {**payload, "cache_ns": ns}
    sup = supervisor()
    events = _typed(_charged(handle.generate(payload, sup.config.server.request_timeout), key,
                             current_app.config["LIMITER"]))
    if stream:
        events = heartbeat(events, sup.config.server.stream_ping_seconds)
    hold(request.scope, events)      # closed when the exchange ends, even if no body ever reads them
    try:
        async for ev in events:
            if ev is None:
                return Run(handle, None, events)
            if isinstance(ev, ev_.Started):
                return Run(handle, ev, events)
        raise APIError(500, "the worker ended the request without an answer", type_="server_error")
    except BaseException:
        await events.aclose()
        raise


async def heartbeat(events: AsyncIterator[ev_.Event], every: float) -> AsyncIterator[Optional[ev_.Event]]:
    """The events, with None after every `every` seconds without one: a stream waiting on a
    long prefill says it is alive (as SSE comments or Anthropic's `ping`)."""
    it = events.__aiter__()
    nxt: Optional[asyncio.Future] = None
    try:
        while True:
            nxt = nxt or asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=every)
            if not done:
                yield None
                continue
            fut, nxt = nxt, None
            try:
                ev = fut.result()
            except StopAsyncIteration:
                return
            yield ev
    finally:
        if nxt is not None:
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
        await events.aclose()


async def count_tokens(handle, payload: dict) -> int:
    """The prompt's length in tokens as the worker would render it, without generating.
    Admitted like a generation (the key's rate limit, the model's request slots), since the
    worker renders and tokenizes it the same way; its tokens are charged to the key."""
    check_serves(handle, "chat")
    key = _admit()
    try:
        reply = await handle.call("count_tokens", timeout=60, load=True, admit=True, **payload)
    except ModelAtCapacity as e:
        raise APIError(429, str(e), type_="rate_limit_error", code="model_at_capacity",
                       headers={"Retry-After": "1"}) from None
    except WorkerGone as e:
        raise APIError(503, str(e), type_="server_error", code="worker_unavailable") from None
    except ModelUnavailable as e:
        raise APIError(503, str(e), type_="server_error", code="model_unavailable") from None
    except asyncio.TimeoutError:
        raise APIError(504, "counting the prompt's tokens timed out", type_="server_error", code="timeout") from None
    if "error" in reply:
        err = reply["error"]
        raise APIError(400, err["message"], code=err.get("code"), param=err.get("param"))
    current_app.config["LIMITER"].charge(key, reply["tokens"])
    return reply["tokens"]
