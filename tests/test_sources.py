"""ollama: and lmstudio: sources and `mlxd models`, on directory trees laid out like the real
libraries (Ollama's manifests and sha256 blobs, LM Studio's publisher/model folders, the HF
cache), pointing at the real embedded GGUF. The import is shared with the other tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_CACHE
from daemon.models import ModelSourceError, resolve_model
from daemon.models.sources import _embedded_gguf


@pytest.fixture(scope="module")
def gguf():
    path = _embedded_gguf("embedded:smollm2")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(gguf):
    return resolve_model(str(gguf[0]), dtype="float32", cache_dir=TEST_CACHE)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def ollama_pull(root, gguf, name, tag, namespace="library", host="registry.ollama.ai"):
    """What `ollama pull` leaves: a manifest naming the layers, the layers as sha256 blobs."""
    path, digest = gguf
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / f"sha256-{digest}"
    if not blob.exists():
        blob.symlink_to(path)
    template = b"{{ .Prompt }}"
    (blobs / f"sha256-{hashlib.sha256(template).hexdigest()}").write_bytes(template)
    manifest = root / "manifests" / host / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64, "size": 1},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": path.stat().st_size},
            {"mediaType": "application/vnd.ollama.image.template",
             "digest": f"sha256:{hashlib.sha256(template).hexdigest()}", "size": len(template)},
        ],
    }))


def test_ollama(home, gguf, reference, tmp_path, monkeypatch):
    root = home / ".ollama" / "models"
    ollama_pull(root, gguf, "smollm2", "135m")
    ollama_pull(root, gguf, "smollm2", "latest")
    ollama_pull(root, gguf, "tiny", "v1", namespace="someone")
    for source in ("ollama:smollm2:135m", "ollama:smollm2", "ollama:someone/tiny:v1"):
        r = resolve_model(source, dtype="float32", cache_dir=TEST_CACHE)
        assert (r.kind, r.path, r.fingerprint) == ("ollama", reference.path, reference.fingerprint), source
    with pytest.raises(ModelSourceError, match=r"no Ollama manifest .* run `ollama pull qwen3:0.6b`"):
        resolve_model("ollama:qwen3:0.6b", cache_dir=TEST_CACHE)

    # OLLAMA_MODELS moves the library, as it does for Ollama.
    moved = tmp_path / "elsewhere"
    ollama_pull(moved, gguf, "moved", "latest")
    monkeypatch.setenv("OLLAMA_MODELS", str(moved))
    assert resolve_model("ollama:moved", dtype="float32", cache_dir=TEST_CACHE).path == reference.path
    with pytest.raises(ModelSourceError, match="no Ollama manifest"):
        resolve_model("ollama:smollm2:135m", cache_dir=TEST_CACHE)

    (moved / "blobs" / f"sha256-{gguf[1]}").unlink()
    with pytest.raises(ModelSourceError, match="model blob .* is missing"):
        resolve_model("ollama:moved", cache_dir=TEST_CACHE)


def lmstudio_tree(models, gguf, reference):
    single = models / "lmstudio-community" / "SmolLM2-135M-Instruct-GGUF"
    single.mkdir(parents=True)
    (single / "SmolLM2-135M-Instruct-Q4_1.gguf").symlink_to(gguf[0])
    (single / "mmproj-SmolLM2-f16.gguf").write_bytes(b"GGUF")  # a vision projector is not the model
    several = models / "bartowski" / "SmolLM2-GGUF"
    several.mkdir(parents=True)
    for quant in ("Q4_1", "Q8_0"):
        (several / f"SmolLM2-{quant}.gguf").symlink_to(gguf[0])
    mlx = models / "mlx-community" / "SmolLM2-135M-Instruct"
    mlx.mkdir(parents=True)
    for f in reference.path.iterdir():
        (mlx / f.name).symlink_to(f)


def test_lmstudio(home, gguf, reference, tmp_path):
    lmstudio_tree(home / ".lmstudio" / "models", gguf, reference)
    r = resolve_model("lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF", dtype="float32", cache_dir=TEST_CACHE)
    assert (r.kind, r.path, r.fingerprint) == ("lmstudio", reference.path, reference.fingerprint)
    r = resolve_model("lmstudio:mlx-community/SmolLM2-135M-Instruct", cache_dir=TEST_CACHE)
    assert (r.kind, r.dtype, r.fingerprint) == ("lmstudio", "float32", reference.fingerprint)
    assert r.path == home / ".lmstudio" / "models" / "mlx-community" / "SmolLM2-135M-Instruct"
    with pytest.raises(ModelSourceError, match="several GGUF files; pick one: lmstudio:bartowski/SmolLM2-GGUF/SmolLM2-Q4_1.gguf"):
        resolve_model("lmstudio:bartowski/SmolLM2-GGUF", cache_dir=TEST_CACHE)
    r = resolve_model("lmstudio:bartowski/SmolLM2-GGUF/SmolLM2-Q8_0.gguf", dtype="float32", cache_dir=TEST_CACHE)
    assert r.path == reference.path
    for bad in ("lmstudio:nobody/nothing", "lmstudio:../etc", "lmstudio:a/../../b"):
        with pytest.raises(ModelSourceError, match="nothing at|not an LM Studio model name"):
            resolve_model(bad, cache_dir=TEST_CACHE)

    # LM Studio's own setting moves its downloads folder.
    moved = tmp_path / "lms"
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(moved)}))
    (moved / "me" / "m").mkdir(parents=True)
    (moved / "me" / "m" / "m.gguf").symlink_to(gguf[0])
    assert resolve_model("lmstudio:me/m", dtype="float32", cache_dir=TEST_CACHE).path == reference.path


def test_mlxd_models_lists_what_resolves(home, gguf, reference):
    ollama_pull(home / ".ollama" / "models", gguf, "smollm2", "135m")
    lmstudio_tree(home / ".lmstudio" / "models", gguf, reference)
    hf = home / ".cache" / "huggingface" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (hf / "snapshots" / "abc").mkdir(parents=True)
    (hf / "refs").mkdir()
    (hf / "refs" / "main").write_text("abc")
    for f in reference.path.iterdir():
        (hf / "snapshots" / "abc" / f.name).symlink_to(f)

    env = {**os.environ, "HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "daemon", "models", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    found = {lib: [m["source"] for m in models] for lib, models in json.loads(out).items()}
    assert found["Ollama"] == ["ollama:smollm2:135m"]
    assert found["LM Studio"] == [
        "lmstudio:bartowski/SmolLM2-GGUF/SmolLM2-Q4_1.gguf",
        "lmstudio:bartowski/SmolLM2-GGUF/SmolLM2-Q8_0.gguf",
        "lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF",
        "lmstudio:mlx-community/SmolLM2-135M-Instruct",
    ]
    assert found["Hugging Face cache"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert "embedded:smollm2" in found["Embedded"]
    # Every listed source pastes into a config as it is.
    for source in found["Ollama"] + found["LM Studio"] + found["Hugging Face cache"]:
        assert resolve_model(source, cache_dir=TEST_CACHE).fingerprint == reference.fingerprint, source

    table = subprocess.run([sys.executable, "-m", "daemon", "models"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ollama:smollm2:135m" in table and f"Ollama ({home}/.ollama/models)" in table
