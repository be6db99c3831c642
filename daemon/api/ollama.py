"""Ollama's model-management routes: /api/tags, /api/show, /api/ps, /api/version, and the
ones that would change the model list (pull, push, create, copy, delete), refused.

mlxd's models are the entries of its config file, so these answer from those entries and
from what each model's last worker reported (its directory, dtype, fingerprint, window):
a field mlxd does not know stays empty rather than guessed. Errors are Ollama's
`{"error": "..."}` (errors.shape_of picks the shape for every /api/ path).
"""

from __future__ import annotations

import json
import os
import struct
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version as dist_version
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field
from quart import Blueprint, jsonify

from ..models.embedded import EMBEDDED
from . import requests as rq
from .errors import APIError
from .schemas import STRICT

bp = Blueprint("ollama", __name__)

# Ollama reports a model kept loaded forever with an expiry this far away
_FOREVER = datetime(2318, 1, 1, tzinfo=timezone.utc)
_PARAM = {"max_tokens": "num_predict"}
_LISTED = ("name", "model", "modified_at", "size", "digest", "details")


def _iso(ts: Optional[float]) -> str:
    return datetime.fromtimestamp(ts or 0.0, tz=timezone.utc).isoformat()


def model(name: str):
    """The model by name or alias, for every Ollama route; Ollama's clients add ':latest' to a
    bare name, so that is tried too. A 404 in Ollama's words otherwise."""
    rq.check_open()
    sup = rq.supervisor()
    handle = sup.get(name) or (sup.get(name.removesuffix(":latest")) if name.endswith(":latest") else None)
    if handle is None:
        raise APIError(404, f"model '{name}' not found", code="model_not_found", param="model")
    return handle


def _weights(path: Path, group_size: int) -> tuple[int, int]:
    """(bytes of the directory's files, parameters counted from the safetensors headers).

    A quantized weight is packed into uint32 words; its element count is its scales' times
    the group size, so a 4-bit model is not reported as an eighth of its parameters."""
    size = params = 0
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        size += f.stat().st_size
        if f.suffix != ".safetensors":
            continue
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            continue                    # not a readable safetensors file: its bytes count, its tensors not
        for key, t in header.items():
            if key == "__metadata__" or key.endswith((".scales", ".biases")):
                continue
            scales = header.get(key.removesuffix(".weight") + ".scales")
            shape = scales["shape"] if scales is not None else t["shape"]
            count = group_size if scales is not None else 1
            for d in shape:
                count *= d
            params += count
    return size, params


def _format(source: str, info: dict) -> str:
    """What the weights came as: "gguf" for a GGUF file, Ollama's store or an embedded GGUF."""
    kind = info.get("kind")
    if kind in ("gguf", "ollama") or source.endswith(".gguf"):
        return "gguf"
    if kind == "embedded" and source.startswith("embedded:"):
        locate = EMBEDDED.get(source.removeprefix("embedded:"))
        return "gguf" if getattr(locate, "format", "") == "gguf" else "safetensors"
    return "safetensors" if info.get("path") else ""


def _template(cfg, path: Optional[Path]) -> str:
    """The chat template in force: the entry's file, else the tokenizer's (Jinja, not Go: mlxd renders Jinja)."""
    if cfg.chat_template is not None:
        return Path(cfg.chat_template).expanduser().read_text()
    if path is None:
        return ""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return ""
    if isinstance(template, list):      # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else ""


def _human(params: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= div:
            return f"{params / div:.1f}{unit}" if params < 100 * div else f"{params / div:.0f}{unit}"
    return str(params)


def _describe(handle) -> dict:
    """Everything these routes report of one model; what its last worker said fills the most."""
    info, cfg = handle.worker_info, handle.cfg
    path = Path(info["path"]) if info.get("path") else None
    config: dict = {}
    size = params = 0
    modified = None
    if path is not None and path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
            modified = (path / "config.json").stat().st_mtime
        except (OSError, ValueError):
            config = {}
        quant = config.get("quantization") or {}
        size, params = _weights(path, int(quant.get("group_size") or 64))
    dtype = info.get("dtype")
    quant = config.get("quantization") or {}
    level = f"Q{quant['bits']}" if quant.get("bits") else {"float32": "F32", "float16": "F16",
                                                          "bfloat16": "BF16"}.get(dtype or "", "")
    family = config.get("model_type", "")
    details = {"parent_model": "", "format": _format(cfg.source, info),
               "family": family, "families": [family] if family else None,
               "parameter_size": _human(params) if params else "", "quantization_level": level}
    return {"name": handle.name, "model": handle.name, "modified_at": _iso(modified or rq.supervisor().loaded_at),
            "size": size, "digest": info.get("fingerprint", ""), "details": details,
            "config": config, "info": info, "params": params, "path": path}


@bp.get("/api/tags")
async def tags():
    rq.check_open()
    return jsonify({"models": [{k: v for k, v in _describe(h).items() if k in _LISTED}
                               for h in rq.supervisor().handles.values()]})


@bp.get("/api/ps")
async def ps():
    """Loaded models; `expires_at` is the last request plus the idle TTL (keep_alive included)."""
    rq.check_open()
    out = []
    for h in rq.supervisor().handles.values():
        if h.state != "ready":
            continue
        d = _describe(h)
        ttl = None if h.pinned else h.idle_ttl
        expires = _FOREVER.isoformat() if ttl is None or ttl == float("inf") else \
            _iso((h.last_used or time.time()) + ttl)
        memory = h.stats.get("memory_bytes") or d["info"].get("mlx_memory_bytes") or d["size"]
        on_gpu = "cpu" not in str(d["info"].get("device", "cpu")).lower()
        out.append({"name": h.name, "model": h.name, "size": memory, "digest": d["digest"], "details": d["details"],
                    "expires_at": expires, "size_vram": memory if on_gpu else 0,
                    "context_length": d["info"].get("context_length", 0)})
    return jsonify({"models": out})


class OllamaShow(BaseModel):
    model_config = STRICT

    model: Optional[str] = Field(None, min_length=1)
    name: Optional[str] = Field(None, min_length=1)        # the older spelling
    verbose: Optional[bool] = None
    system: Optional[str] = None
    template: Optional[str] = None
    options: Optional[dict] = None


@bp.post("/api/show")
async def show():
    body = await rq.body(OllamaShow)
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required", param="model")
    handle = model(name)
    d = _describe(handle)
    cfg, info, config = handle.cfg, d["info"], d["config"]
    family = d["details"]["family"]
    # the config's sampling defaults under Ollama's parameter names (an embedder samples nothing)
    sampling = {} if handle.serves == "embedding" else \
        {_PARAM.get(k, k): v for k, v in cfg.sampling.model_dump().items() if v is not None}
    parameters = "\n".join(f"{k} {v}" for k, v in sampling.items())
    template = _template(cfg, d["path"])
    model_info = {"general.architecture": family} if family else {}
    if d["params"]:
        model_info["general.parameter_count"] = d["params"]
    if family and info.get("context_length"):
        model_info[f"{family}.context_length"] = info["context_length"]
    for key, name_ in (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                       ("num_attention_heads", "attention.head_count"), ("vocab_size", "vocab_size")):
        if family and key in config:
            model_info[f"{family}.{name_}"] = config[key]
    capabilities = {"embedding": ["embedding"], "chat": ["completion"]}.get(handle.serves, [])
    if handle.serves == "chat" and "tools" in template:
        capabilities.append("tools")
    if info.get("thinking"):                     # the worker's markers: known once it has loaded
        capabilities.append("thinking")
    modelfile = (f"# mlxd serves this model from the entry '{handle.name}' of {rq.supervisor().config_path}\n"
                 f"FROM {cfg.source}\n" + "".join(f"PARAMETER {k} {v}\n" for k, v in sampling.items()))
    return jsonify({"modelfile": modelfile, "parameters": parameters, "template": template,
                    "details": d["details"], "model_info": model_info, "capabilities": capabilities,
                    "modified_at": d["modified_at"]})


@bp.get("/api/version")
async def version():
    try:
        v = dist_version("mlxd")
    except PackageNotFoundError:
        v = "0.0.0"
    return jsonify({"version": v})


def _refuse(what: str):
    path = rq.supervisor().config_path or "its config file"
    raise APIError(403, f"{what} is not supported: mlxd reads its models from its config file ({os.fspath(path)}); "
                        "add, rename or remove an entry under `models:` there and mlxd reloads it")


@bp.post("/api/pull")
async def pull():
    _refuse("pulling a model")


@bp.post("/api/push")
async def push():
    _refuse("pushing a model")


@bp.post("/api/create")
async def create():
    _refuse("creating a model")


@bp.post("/api/copy")
async def copy():
    _refuse("copying a model")


@bp.delete("/api/delete")
async def delete():
    _refuse("deleting a model")
