"""Ollama's model-management routes through the official `ollama` Python library, against the real
daemon: list, show, ps, version, and pull/delete/copy refused (mlxd reads its models from its config).

The library's pydantic response types (ListResponse, ShowResponse, ProcessResponse) must parse each
answer; the values are checked against what the daemon's own /v1/status says of each worker.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone
from importlib.metadata import version as dist_version
from pathlib import Path

import httpx
import ollama
import pytest

from conftest import OnDemandDaemon, smol, wait_until

MINILM = "embedded:all-minilm-l6-v2"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with OnDemandDaemon(tmp_path_factory.mktemp("ollama-meta"), [
        smol("chat", aliases=["smol"], idle_ttl=600, sampling={"temperature": 0.0, "max_tokens": 8}),
        {"name": "minilm", "source": MINILM, "pinned": True},
        smol("later", preload=False),
    ]) as d:
        wait_until(lambda: all(d.model_status(n)["state"] == "ready" for n in ("chat", "minilm")), 300,
                   lambda: d.tail())
        yield d


@pytest.fixture(scope="module")
def c(daemon):
    return ollama.Client(host=daemon.url, timeout=60)


def worker(daemon, name: str) -> dict:
    return daemon.model_status(name)["worker"]


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def test_list_names_every_entry_with_what_its_worker_loaded(daemon, c):
    r = c.list()
    assert isinstance(r, ollama.ListResponse)
    models = {m.model: m for m in r.models}
    assert set(models) == {"chat", "minilm", "later"}
    raw = {m["name"]: m for m in httpx.get(f"{daemon.url}/api/tags").json()["models"]}
    assert {n: m["model"] for n, m in raw.items()} == {n: n for n in models}    # Ollama sends both keys

    chat, info = models["chat"], worker(daemon, "chat")
    assert chat.digest == info["fingerprint"] and len(chat.digest) == 64
    assert chat.size == dir_bytes(info["path"])
    assert chat.modified_at is not None and chat.modified_at.tzinfo is not None
    assert chat.details.format == "gguf"                 # embedded:smollm2 ships as a GGUF
    assert chat.details.family == "llama" and chat.details.families == ["llama"]
    assert chat.details.quantization_level == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(
        info["dtype"], chat.details.quantization_level)
    assert chat.details.parameter_size.endswith("M")

    minilm = models["minilm"]
    assert minilm.details.format == "safetensors" and minilm.details.family == "bert"
    assert minilm.digest == worker(daemon, "minilm")["fingerprint"]

    later = models["later"]                              # never loaded: nothing known, nothing guessed
    assert later.digest == "" and later.size == 0 and later.details.family == ""


def test_show_reports_template_parameters_and_model_info(daemon, c):
    info = worker(daemon, "chat")
    r = c.show("chat")
    assert isinstance(r, ollama.ShowResponse)
    assert "completion" in r.capabilities
    assert r.modelinfo["general.architecture"] == "llama"
    assert r.modelinfo["llama.context_length"] == info["context_length"]
    assert 100e6 < r.modelinfo["general.parameter_count"] < 200e6       # SmolLM2-135M
    tokenizer_config = json.loads((Path(info["path"]) / "tokenizer_config.json").read_text())
    assert r.template == tokenizer_config["chat_template"] and "<|im_start|>" in r.template
    assert set(r.parameters.splitlines()) == {"temperature 0.0", "top_p 1.0", "num_predict 8"}
    assert f"FROM {'embedded:smollm2'}" in r.modelfile and str(daemon.config_path) in r.modelfile
    assert r.details.family == "llama"

    assert c.show("smol:latest").modelinfo == r.modelinfo      # an alias, with the tag clients add

    e = c.show("minilm")
    assert e.capabilities == ["embedding"] and e.parameters == ""     # no sampling defaults for an embedder
    assert e.modelinfo["bert.embedding_length"] == 384 and e.modelinfo["bert.block_count"] == 6
    assert 20e6 < e.modelinfo["general.parameter_count"] < 25e6         # all-MiniLM-L6-v2: 22.7M


def test_ps_lists_loaded_models_with_their_expiry(daemon, c):
    daemon.openai().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=1)
    r = c.ps()
    assert isinstance(r, ollama.ProcessResponse)
    models = {m.model: m for m in r.models}
    assert set(models) == {"chat", "minilm"}            # "later" is not loaded
    chat, st = models["chat"], daemon.model_status("chat")
    expected = datetime.fromtimestamp(st["last_used"] + 600, tz=timezone.utc)     # the entry's idle_ttl
    assert abs(chat.expires_at - expected) < timedelta(seconds=1)
    assert models["minilm"].expires_at.year == 2318     # pinned: Ollama's "forever"
    info = st["worker"]
    assert chat.context_length == info["context_length"]
    assert chat.size > 0 and chat.digest == info["fingerprint"]
    assert chat.size_vram == (0 if "cpu" in info["device"].lower() else chat.size)


def test_version(daemon):
    r = httpx.get(f"{daemon.url}/api/version")
    assert r.status_code == 200 and r.json() == {"version": dist_version("mlxd")}


def test_model_changes_are_refused_naming_the_config_file(daemon, c):
    for call in (lambda: c.pull("llama3.2"), lambda: c.delete("chat"), lambda: c.copy("chat", "chat2")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 403
        assert "not supported" in e.value.error and str(daemon.config_path) in e.value.error
    assert {m.model for m in c.list().models} == {"chat", "minilm", "later"}     # nothing changed


def test_an_answer_sent_before_the_body_arrived_closes_its_connection(daemon, c):
    """A refusal does not wait for the body, and the server cannot reuse a connection whose request
    it did not receive to its end: the answer says `Connection: close`, and the server then closes
    it (CI once saw the library's delete, reusing the connection after a refused pull, get
    "Server disconnected without sending a response"). Headers only, the body never sent, makes
    the case certain."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    for method, path in (("POST", "/api/pull"), ("DELETE", "/api/delete"), ("POST", "/api/copy")):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 64\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(65536):       # ends only when the server closes the connection
                answer += chunk
        head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
        assert head.startswith("http/1.1 403") and "\r\nconnection: close" in head, head
    # A route that reads its body answers after the body arrived: that connection is kept.
    with httpx.Client(base_url=daemon.url, timeout=30) as h:
        for _ in range(5):
            r = h.post("/api/show", json={"model": "chat"})
            assert r.status_code == 200 and r.headers.get("connection") != "close", r.headers
            assert h.post("/api/pull", json={"model": "llama3.2"}).status_code == 403
            assert h.get("/api/version").status_code == 200
    for _ in range(10):
        for call in (lambda: c.pull("llama3.2"), lambda: c.delete("chat"), lambda: c.copy("chat", "chat2")):
            with pytest.raises(ollama.ResponseError):
                call()


def test_unknown_model_is_a_404_in_ollamas_shape(daemon, c):
    with pytest.raises(ollama.ResponseError) as e:
        c.show("no-such-model")
    assert e.value.status_code == 404 and e.value.error == "model 'no-such-model' not found"
    r = httpx.post(f"{daemon.url}/api/show", json={})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    r = httpx.post(f"{daemon.url}/api/show", content=b"{")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_a_model_loaded_later_reports_its_worker(daemon, c):
    """Once `later` has loaded (on demand), ps and show know what its worker loaded."""
    daemon.openai().chat.completions.create(model="later", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=1)
    wait_until(lambda: daemon.model_status("later")["state"] == "ready", 120, "later to load")
    assert "later" in {m.model for m in c.ps().models}
    assert c.show("later").details.family == "llama"
