"""Embeddings: OpenAI's POST /v1/embeddings and Ollama's /api/embed and /api/embeddings.

Each route turns its body into the worker's `embed` payload (inputs as text or token ids,
truncation, dimensions) and goes through the shared request path (`requests.py`: model by
name or alias, rate limit, admission, errors in the route's shape). The worker answers one
`embedding` event with every vector (float32, base64), so OpenAI's base64 encoding is
those bytes as they came, and floats are exact float32 values.
"""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, Field
from quart import Blueprint, jsonify

from .. import events as ev_
from . import ollama_ttl
from . import requests as rq
from .errors import APIError
from .ollama import model as ollama_model
from .schemas import STRICT, Count

bp = Blueprint("embeddings", __name__)


def _inputs(value: Any, param: str = "input") -> list:
    """OpenAI's four forms of `input`, as a list of strings or token-id lists; a 400 naming the bad item."""
    def bad(where: str, what: str):
        raise APIError(400, f"Invalid value for '{where}': {what}", param=where, code="invalid_value")

    def ids(x, where: str) -> list[int]:
        if not x:
            bad(where, "an array of token ids must not be empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            bad(where, "expected an array of integer token ids")
        return x

    if isinstance(value, str):
        if not value:
            bad(param, "the input must not be an empty string")
        return [value]
    if not isinstance(value, list) or not value:
        bad(param, "expected a string, an array of strings, an array of token ids or an array of such arrays")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [ids(value, param)]
    out = []
    for i, x in enumerate(value):
        where = f"{param}[{i}]"
        if isinstance(x, str):
            if not x:
                bad(where, "the input must not be an empty string")
            out.append(x)
        elif isinstance(x, list):
            out.append(ids(x, where))
        else:
            bad(where, "expected a string or an array of token ids")
    return out


class EmbeddingRequest(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1)
    input: Any = Field(description="A string, an array of strings, an array of token ids, or an array of those.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[Count] = Field(None, ge=1)
    user: Optional[str] = None


async def embed(handle, inputs: list, *, surface: str, truncate: Optional[bool] = None,
                dimensions: Optional[int] = None) -> tuple[np.ndarray, ev_.Done]:
    """The vectors of `inputs` ([n, d] float32) and the worker's `done` (usage, timings)."""
    payload = {"surface": surface, "embed": {"input": inputs, "truncate": truncate, "dimensions": dimensions}}
    run = await rq.start(handle, payload)
    vectors = None
    async with contextlib.aclosing(run.events):
        async for ev in run.events:
            if isinstance(ev, ev_.Embedding):
                vectors = np.frombuffer(base64.b64decode(ev.data), dtype="<f4").reshape(ev.count, ev.dimensions)
            elif isinstance(ev, ev_.Done):
                if vectors is None:
                    raise APIError(500, "the worker finished without vectors", type_="server_error")
                return vectors, ev
    raise APIError(500, "the worker ended the request without an answer", type_="server_error")


@bp.post("/v1/embeddings")
async def openai_embeddings():
    rq.check_open()
    body = await rq.body(EmbeddingRequest)
    inputs = _inputs(body.input)
    handle = rq.model(body.model)
    vectors, done = await embed(handle, inputs, surface="embeddings", dimensions=body.dimensions)
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    n = done.usage["prompt_tokens"]
    return jsonify({"object": "list", "model": handle.name,
                    "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                    "usage": {"prompt_tokens": n, "total_tokens": n}})


# -- Ollama --------------------------------------------------------------------------------

class OllamaEmbed(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1)
    input: Any = None
    truncate: bool = True               # Ollama's default: cut to the window
    dimensions: Optional[Count] = Field(None, ge=1)
    options: Optional[dict] = None
    keep_alive: Any = None


class OllamaEmbeddings(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1)
    prompt: Optional[str] = None
    options: Optional[dict] = None
    keep_alive: Any = None


# Ollama's runtime options that place or size the computation; mlxd sets these in its config,
# and none of them changes a vector, so they are accepted. Any other option (sampling, num_ctx)
# would change nothing here either, and is refused rather than silently ignored.
HARDWARE_OPTIONS = frozenset({"num_thread", "num_gpu", "main_gpu", "num_batch", "use_mmap",
                              "use_mlock", "low_vram", "numa", "vocab_only"})


def _check_options(options: Optional[dict]) -> None:
    for key in sorted(set(options or {}) - HARDWARE_OPTIONS):
        raise APIError(400, f"option '{key}' is not supported on an embedding request "
                            f"(accepted: {', '.join(sorted(HARDWARE_OPTIONS))}; the window is the model's, "
                            "set truncate to choose cutting or refusing)", param=f"options.{key}")


async def _ollama(handle, inputs: list, keep_alive, **kw):
    """Vectors and `done` of an Ollama request, with its keep_alive applied; no inputs only loads the model."""
    seconds = ollama_ttl.parse(keep_alive)
    rq.check_serves(handle, "embedding")
    ollama_ttl.before(handle, seconds)
    t0 = time.perf_counter()
    try:
        if not inputs:
            await handle.wait_ready(rq.supervisor().config.server.worker_start_timeout)
            return np.zeros((0, 0), dtype="<f4"), None, time.perf_counter() - t0
        vectors, done = await embed(handle, inputs, surface="ollama.embed", **kw)
        return vectors, done, time.perf_counter() - t0
    finally:
        ollama_ttl.after(handle, seconds, rq.supervisor())


@bp.post("/api/embed")
async def ollama_embed():
    body = await rq.body(OllamaEmbed)
    _check_options(body.options)
    handle = ollama_model(body.model)
    inputs = [] if body.input in (None, "", []) else _inputs(body.input)
    vectors, done, total = await _ollama(handle, inputs, body.keep_alive, truncate=body.truncate,
                                         dimensions=body.dimensions)
    worker = done.timings["total"] if done else 0.0          # in the worker: queue + forward passes
    return jsonify({"model": body.model, "embeddings": vectors.tolist(),
                    "total_duration": int(total * 1e9), "load_duration": int(max(total - worker, 0.0) * 1e9),
                    "prompt_eval_count": done.usage["prompt_tokens"] if done else 0})


@bp.post("/api/embeddings")
async def ollama_embeddings():
    """Ollama's older route: one `prompt`, one `embedding`."""
    body = await rq.body(OllamaEmbeddings)
    _check_options(body.options)
    handle = ollama_model(body.model)
    inputs = [body.prompt] if body.prompt else []
    vectors, _, _ = await _ollama(handle, inputs, body.keep_alive, truncate=True)
    return jsonify({"embedding": vectors[0].tolist() if len(vectors) else []})
