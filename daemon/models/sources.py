"""Turn a model source string into a local mlx-lm directory.

Never touches the network: a Hugging Face repo id is only looked up in the local
HF cache, Ollama and LM Studio names in their libraries on disk (`libraries.py`).
GGUF files are imported once into `cache_dir/models/`, keyed by their content hash,
so later starts only stat files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import libraries
from ..worker.blas import auto_dtype
from .embedded import EmbeddedError, embedded_gguf
from .gguf import DTYPES, IMPORTER_VERSION

KINDS = ("mlx-dir", "hf-cache", "gguf", "embedded", "ollama", "lmstudio")

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HASH_MEMO = "file-hashes.json"  # in cache_dir/models, so daemons sharing imports share it too
_STALE_TMP_S = 24 * 3600
# Files that decide what a model directory computes; the fingerprint covers exactly these.
_FINGERPRINT_GLOBS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.*",
)
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class ModelSourceError(Exception):
    """A model source that cannot be turned into a local model directory."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # an mlx-lm model directory, loadable with mlx_lm.load
    kind: str  # one of KINDS
    dtype: str  # one of DTYPES: what the weights in `path` actually are
    fingerprint: str  # sha256 hex over the weight, config and tokenizer files' contents


def resolve_model(source: str, *, dtype: str = "auto", cache_dir: Path) -> ResolvedModel:
    """Resolve `embedded:NAME`, `ollama:NAME[:TAG]`, `lmstudio:PUBLISHER/MODEL`, a .gguf
    path, an MLX model dir or an HF repo id.

    `dtype` picks the import dtype of GGUF sources ("auto": packed quantized
    weights on Metal, float32 on CPU where MLX's quantized kernels are slow).
    Directories are used as they are, so an explicit dtype must match theirs.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ModelSourceError(f"unknown dtype {dtype!r}; expected 'auto' or one of {', '.join(DTYPES)}")
    cache_dir = Path(cache_dir).expanduser().absolute()

    scheme, _, name = source.partition(":")
    if scheme == "embedded":
        found = _embedded_gguf(source, cache_dir)
        if found.is_dir():       # a model directory (the embedded embedding model)
            return _from_dir(found, dtype, cache_dir, "embedded", source)
        return _from_gguf(found, dtype, cache_dir, "embedded")
    if scheme in ("ollama", "lmstudio"):
        tried = []
        if scheme == "ollama" and (blob := libraries.ollama_gguf(name, tried)):
            return _from_gguf(blob, dtype, cache_dir, "ollama")
        if scheme == "lmstudio" and (found := libraries.lmstudio_model(name, tried)):
            if found.kind == "gguf":
                return _from_gguf(found.path, dtype, cache_dir, "lmstudio")
            return _from_dir(found.path, dtype, cache_dir, "lmstudio", source)
        raise ModelSourceError(f"cannot resolve model source {source!r}: " + "; ".join(tried))

    path = Path(source).expanduser()
    if path.is_file():
        if not _is_gguf(path):
            raise ModelSourceError(f"model source {source!r}: {path} is a file but not a GGUF file")
        return _from_gguf(path, dtype, cache_dir, "gguf")
    if path.is_dir():
        return _from_dir(path.absolute(), dtype, cache_dir, "mlx-dir", source)

    tried = [f"no file or directory at {path.absolute()}"]
    if _REPO_ID.fullmatch(source):
        snapshot = libraries.hf_snapshot(source, tried)
        if snapshot is not None:
            if libraries.is_mlx_dir(snapshot):
                return _from_dir(snapshot, dtype, cache_dir, "hf-cache", source)
            ggufs = sorted(snapshot.glob("*.gguf"))
            if len(ggufs) == 1:
                return _from_gguf(ggufs[0], dtype, cache_dir, "gguf")
            found = ", ".join(p.name for p in ggufs) or "none"
            tried.append(
                f"HF cache snapshot {snapshot} has no config.json + model*.safetensors "
                f"and not exactly one .gguf (found: {found}); pass the .gguf path instead"
            )
    else:
        tried.append("not an HF repo id of the form 'org/name'")
    raise ModelSourceError(f"cannot resolve model source {source!r}: " + "; ".join(tried))


def _embedded_gguf(source: str, cache_dir: Path | None = None) -> Path:
    try:
        return embedded_gguf(source.removeprefix("embedded:"), cache_dir)
    except EmbeddedError as e:
        raise ModelSourceError(f"{source!r}: {e}") from None


def _from_gguf(path: Path, dtype: str, cache_dir: Path, kind: str) -> ResolvedModel:
    dtype = auto_dtype() if dtype == "auto" else dtype
    digest = _file_sha256(path, cache_dir)
    out = cache_dir / "models" / f"{digest}-{dtype}-v{IMPORTER_VERSION}"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Workers of several models on one GGUF start together; one imports, the rest wait.
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.is_dir():
                _import(path, out, dtype)
    return ResolvedModel(out, kind, dtype, _fingerprint(out, cache_dir))


def _import(path: Path, out: Path, dtype: str) -> None:
    from .gguf import import_gguf

    _remove_stale_tmp(out.parent)
    try:
        import_gguf(path, out, dtype)
    except FileExistsError:
        pass  # another process finished the same import first
    except (ValueError, RuntimeError) as e:
        raise ModelSourceError(f"cannot import GGUF {path}: {e}") from e


def _from_dir(path: Path, dtype: str, cache_dir: Path, kind: str, source: str) -> ResolvedModel:
    if not libraries.is_mlx_dir(path):
        raise ModelSourceError(
            f"model source {source!r}: {path} is not an MLX model directory (needs config.json and model*.safetensors)"
        )
    actual = _dir_dtype(path)
    if dtype != "auto" and dtype != actual:
        raise ModelSourceError(
            f"model source {source!r} is stored as {actual}, but dtype {dtype!r} was requested; "
            "use dtype 'auto' (directories are used as they are)"
        )
    return ResolvedModel(path, kind, actual, _fingerprint(path, cache_dir))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _dir_dtype(path: Path) -> str:
    """The dtype of a model dir: its quantization block, else the float type of most bytes."""
    with open(path / "config.json") as f:
        if "quantization" in json.load(f):
            return "quantized"
    counts = Counter()
    for weights in path.glob("model*.safetensors"):
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                counts[v["dtype"]] += v["data_offsets"][1] - v["data_offsets"][0]
    floats = [d for d, _ in counts.most_common() if d in _SAFETENSORS_DTYPES]
    return _SAFETENSORS_DTYPES[floats[0]] if floats else "float32"


def _fingerprint(path: Path, cache_dir: Path) -> str:
    """sha256 over (name, content sha256) of the files that define the model."""
    files = sorted({p for g in _FINGERPRINT_GLOBS for p in path.glob(g) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_sha256(p, cache_dir)}\n".encode())
    return h.hexdigest()


def _file_sha256(path: Path, cache_dir: Path) -> str:
    """Content sha256, memoised by (real path, size, mtime_ns) so restarts only stat."""
    real = str(Path(path).resolve())
    st = os.stat(real)
    key = [st.st_size, st.st_mtime_ns]
    memo_path = cache_dir / "models" / _HASH_MEMO
    memo = _read_memo(memo_path)
    if (hit := memo.get(real)) and hit[:2] == key:
        return hit[2]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    memo = _read_memo(memo_path)  # re-read: hashing a big file takes a while
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}
    memo[real] = key + [digest]
    _write_json_atomic(memo_path, memo)
    return digest


def _read_memo(path: Path) -> dict:
    try:
        with open(path) as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _remove_stale_tmp(models_dir: Path) -> None:
    """Drop half-built imports left by a killed process (live ones are younger)."""
    cutoff = time.time() - _STALE_TMP_S
    for p in models_dir.glob(".*.tmp"):
        try:
            if p.is_dir() and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
