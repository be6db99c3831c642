"""Where other tools keep the models people already have, and what is in them.

Hugging Face's cache, Ollama's and LM Studio's libraries are read as they lie on disk;
nothing is downloaded and nothing is written there. Each lookup returns a local path
(an MLX directory or a GGUF file) or None with the reason appended to `tried`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


@dataclass(frozen=True)
class Found:
    source: str  # what to paste into the config's `source:`
    path: Path  # an MLX directory or a GGUF file
    kind: str  # "mlx-dir" or "gguf"


def is_mlx_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def _model_ggufs(path: Path) -> list[Path]:
    # Vision projectors ride along with LM Studio's and HF's GGUF repos; they are not language models.
    return sorted(p for p in path.glob("*.gguf") if not p.name.lower().startswith("mmproj"))


# -- Hugging Face cache ----------------------------------------------------------------

def hf_hub_dir() -> Path:
    if hub := os.environ.get("HF_HUB_CACHE"):
        return Path(hub).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def hf_snapshot(repo_id: str, tried: list) -> Path | None:
    """The snapshot refs/main points to, else the newest one."""
    repo = hf_hub_dir() / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        tried.append(f"not in the Hugging Face cache ({repo} does not exist; mlxd never downloads, run `hf download {repo_id}`)")
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
        tried.append(f"HF cache refs/main points to a missing snapshot {snapshot}")
        return None
    snapshots = [p for p in (repo / "snapshots").glob("*") if p.is_dir()]
    if not snapshots:
        tried.append(f"HF cache entry {repo} has no snapshots")
        return None
    return max(snapshots, key=lambda p: p.stat().st_mtime_ns)


# -- Ollama ------------------------------------------------------------------------------

def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def _ollama_manifest_path(name: str) -> Path:
    """NAME[:TAG] as Ollama spells it: `llama3.2`, `qwen3:0.6b`, `user/model:tag`, `host/ns/model:tag`."""
    repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    parts = repo.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    return ollama_dir() / "manifests" / Path(*parts) / (tag or "latest")


def ollama_gguf(name: str, tried: list) -> Path | None:
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+){0,2}(:[\w.-]+)?", name):
        tried.append("not an Ollama model name (NAME[:TAG])")
        return None
    manifest = _ollama_manifest_path(name)
    try:
        layers = json.loads(manifest.read_text())["layers"]
    except FileNotFoundError:
        tried.append(f"no Ollama manifest at {manifest} (mlxd never downloads: run `ollama pull {name}`)")
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        tried.append(f"unreadable Ollama manifest {manifest}: {e}")
        return None
    digests = [layer.get("digest", "") for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER]
    if not digests:
        tried.append(f"Ollama manifest {manifest} has no model layer")
        return None
    blob = ollama_dir() / "blobs" / digests[0].replace(":", "-")
    if not blob.is_file():
        tried.append(f"Ollama's model blob {blob} is missing")
        return None
    return blob


def _ollama_list() -> list[Found]:
    root = ollama_dir() / "manifests"
    out = []
    for manifest in sorted(p for p in root.glob("*/*/*/*") if p.is_file()):
        host, ns, model, tag = manifest.relative_to(root).parts
        name = model if (host, ns) == (OLLAMA_REGISTRY, "library") else (f"{ns}/{model}" if host == OLLAMA_REGISTRY else f"{host}/{ns}/{model}")
        name = f"{name}:{tag}"
        if blob := ollama_gguf(name, []):
            out.append(Found(f"ollama:{name}", blob, "gguf"))
    return out


# -- LM Studio ---------------------------------------------------------------------------

def lmstudio_dir() -> Path:
    """LM Studio's downloads folder: its setting if set, else today's default, else the pre-0.3 one."""
    home = Path.home()
    try:
        folder = json.loads((home / ".lmstudio" / "settings.json").read_text()).get("downloadsFolder")
        if folder:
            return Path(folder).expanduser()
    except (OSError, ValueError, AttributeError):
        pass
    for d in (home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"):
        if d.is_dir():
            return d
    return home / ".lmstudio" / "models"


def lmstudio_model(name: str, tried: list) -> Found | None:
    """PUBLISHER/MODEL (an MLX dir, or a dir with one GGUF) or PUBLISHER/MODEL/FILE.gguf."""
    parts = name.split("/")
    if len(parts) not in (2, 3) or any(p in ("", ".", "..") for p in parts):
        tried.append("not an LM Studio model name (PUBLISHER/MODEL or PUBLISHER/MODEL/FILE.gguf)")
        return None
    path = lmstudio_dir() / name
    if path.is_file() and path.suffix == ".gguf":
        return Found(f"lmstudio:{name}", path, "gguf")
    if not path.is_dir():
        tried.append(f"nothing at {path} in LM Studio's models folder")
        return None
    if is_mlx_dir(path):
        return Found(f"lmstudio:{name}", path, "mlx-dir")
    ggufs = _model_ggufs(path)
    if len(ggufs) == 1:
        return Found(f"lmstudio:{name}", ggufs[0], "gguf")
    choices = ", ".join(f"lmstudio:{name}/{p.name}" for p in ggufs)
    tried.append(f"{path} holds several GGUF files; pick one: {choices}" if ggufs
                 else f"{path} is neither an MLX model directory nor holds a GGUF file")
    return None


def _lmstudio_list() -> list[Found]:
    root = lmstudio_dir()
    out = []
    for d in sorted(p for p in root.glob("*/*") if p.is_dir()):
        name = "/".join(d.relative_to(root).parts)
        if is_mlx_dir(d):
            out.append(Found(f"lmstudio:{name}", d, "mlx-dir"))
            continue
        ggufs = _model_ggufs(d)
        for g in ggufs:
            out.append(Found(f"lmstudio:{name}" + (f"/{g.name}" if len(ggufs) > 1 else ""), g, "gguf"))
    return out


def _hf_list() -> list[Found]:
    out = []
    for repo in sorted(hf_hub_dir().glob("models--*")):
        repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
        snapshot = hf_snapshot(repo_id, [])
        if snapshot is None:
            continue
        if is_mlx_dir(snapshot):
            out.append(Found(repo_id, snapshot, "mlx-dir"))
            continue
        ggufs = _model_ggufs(snapshot)
        for g in ggufs:
            out.append(Found(repo_id if len(ggufs) == 1 else str(g), g, "gguf"))
    return out


def discover() -> dict[str, list[Found]]:
    """Every model found in the three libraries, by library."""
    return {"Hugging Face cache": _hf_list(), "Ollama": _ollama_list(), "LM Studio": _lmstudio_list()}
