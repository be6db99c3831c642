"""Model resolution and GGUF import, checked on the real embedded SmolLM2 GGUF.

No mocks: the GGUF is imported for real (once per session, into a tmp cache),
loaded with mlx_lm.load and judged by perplexity, greedy answers, a token-exact
tokenizer and an independent numpy forward pass over the GGUF's own tensors.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from daemon.models import ModelSourceError, resolve_model
from daemon.models.gguf import IMPORTER_VERSION, import_gguf
from daemon.models.sources import _embedded_gguf

PROSE = (
    "The history of the city begins in the early Middle Ages, when a small group of farmers settled on "
    "the banks of the river. Over the following centuries, the village grew into a busy market town, and "
    "merchants came from far away to sell wool, grain and salt. In the eighteenth century, new roads and a "
    "canal connected the town to the capital, and the first factories were built near the water. Today, the "
    "old town is a popular destination for tourists, who visit its narrow streets, its cathedral and its "
    "many small museums."
)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return _embedded_gguf("embedded:smollm2")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlxd-cache")


@pytest.fixture(scope="session")
def f32(cache_dir):
    t0 = time.perf_counter()
    resolved = resolve_model("embedded:smollm2", dtype="float32", cache_dir=cache_dir)
    print(f"float32 import + fingerprint: {time.perf_counter() - t0:.2f}s")  # ~3-4 s here
    return resolved


@pytest.fixture(scope="session")
def quant(cache_dir):
    return resolve_model("embedded:smollm2", dtype="quantized", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def f32_loaded(f32):
    from mlx_lm import load

    return load(str(f32.path))


def perplexity(model, ids: list[int]) -> float:
    return _perplexity(model(mx.array(ids[:-1])[None]), ids)


def _perplexity(logits: mx.array, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] given logits over ids[:-1] (extra trailing positions ignored)."""
    logits = logits[:, : len(ids) - 1].astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, mx.array(ids[1:])[None]).mean().item())


def test_float32_perplexity_is_low(f32_loaded):
    model, tokenizer = f32_loaded
    ids = tokenizer.encode(PROSE)
    assert 90 <= len(ids) <= 130
    # Measured 11.98 on the 107 tokens; a wrong permutation or tokenizer gives hundreds to thousands.
    assert perplexity(model, ids) < 20


@pytest.mark.parametrize(
    "question, keywords",
    [
        # Measured answers: "The capital of France is Paris.", "A week is approximately 7 days.",
        # "The answer to this classic math problem is 4."
        ("What is the capital of France?", ["Paris"]),
        ("How many days are in a week?", ["7", "seven"]),
        ("What is 2 + 2?", ["4", "four"]),
    ],
)
def test_greedy_chat_answers(f32_loaded, question, keywords):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = f32_loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=24, sampler=make_sampler(temp=0.0))
    assert any(k in answer for k in keywords), answer


def test_quantized_import_matches_float32(quant, f32_loaded):
    from mlx_lm import load

    model, tokenizer = load(str(quant.path))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 32)
    if not mx.metal.is_available():
        # MLX's CPU quantized matmul is ~35x slower with float16 activations than float32;
        # float32 scales compute the same packed weights. (test_gguf_archs.py runs float16
        # activations of packed Q8_0/Q4_0 on tiny files, against the numpy reference.)
        model.set_dtype(mx.float32)
    # A prefix keeps the CPU quantized kernels to a few seconds.
    ids = tokenizer.encode(PROSE)[:32]
    x = mx.array(ids)[None]
    logits_q, logits_f = model(x), f32_loaded[0](x)
    # The float32 import is the exact dequantization of these packed weights: measured
    # perplexity 9.254 for both on the 32-token prefix, max |logit diff| 1.3e-4, same top-1.
    assert _perplexity(logits_q, ids) == pytest.approx(_perplexity(logits_f, ids), rel=0.05)
    assert mx.mean(logits_q.argmax(-1) == logits_f.argmax(-1)).item() > 0.9


def test_tokenizer(f32_loaded):
    _, tokenizer = f32_loaded
    # Expected ids come from llama.cpp's own tokenizer on the same GGUF (llama_cpp vocab_only).
    text = "In 2024, 1,000 naïve cafés served crème brûlée 🤖."
    ids = tokenizer.encode(text)
    assert ids == [788, 216, 34, 32, 34, 36, 28, 216, 33, 28, 32, 32, 32, 15486, 46494, 20879, 17842,
                   5019, 1650, 11180, 1558, 1156, 41307, 92, 20174, 15107, 114, 240, 30]
    assert tokenizer.decode(ids) == text
    chat = "<|im_start|>user\nHi!<|im_end|>\n"
    assert tokenizer.encode(chat) == [1, 4093, 198, 26843, 17, 2, 198]
    for text in ["  spaces\tand\nnewlines  ", "Ωμέγα Привет 東京 x² ∑", "def f(x):\n    return x**2\n", "12345 67"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert 2 in tokenizer.eos_token_ids
    assert tokenizer.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_resolve_is_cached(f32, quant, cache_dir, gguf_path):
    assert (f32.kind, f32.dtype) == ("embedded", "float32")
    assert f32.path.parent == cache_dir / "models" and f32.path.name.endswith(f"-float32-v{IMPORTER_VERSION}")
    weights = f32.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    memo = cache_dir / "models" / "file-hashes.json"      # rewritten (replaced) after every hash
    memo_before = (memo.stat().st_ino, memo.stat().st_mtime_ns, memo.read_bytes())
    again = resolve_model("embedded:smollm2", dtype="float32", cache_dir=cache_dir)
    assert again == f32
    assert weights.stat().st_mtime_ns == mtime  # not re-imported
    assert (memo.stat().st_ino, memo.stat().st_mtime_ns, memo.read_bytes()) == memo_before  # only stats: no file hashed
    assert quant.fingerprint != f32.fingerprint and quant.dtype == "quantized"
    assert len(f32.fingerprint) == 64 and int(f32.fingerprint, 16) >= 0

    by_path = resolve_model(str(gguf_path), dtype="float32", cache_dir=cache_dir)
    assert (by_path.kind, by_path.path, by_path.fingerprint) == ("gguf", f32.path, f32.fingerprint)
    assert not list((cache_dir / "models").glob(".*.tmp"))  # no half-built imports left behind
    with pytest.raises(FileExistsError):
        import_gguf(gguf_path, f32.path, "float32")


def test_concurrent_resolves_share_one_import(tmp_path):
    code = (
        "import sys, json; from daemon.models import resolve_model; "
        "r = resolve_model('embedded:smollm2', dtype='quantized', cache_dir=sys.argv[1]); "
        "print(json.dumps([str(r.path), r.fingerprint]))"
    )
    root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results[0] == results[1]
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [Path(results[0][0]).name]


def test_resolve_local_dir_and_hf_cache(f32, quant, cache_dir, tmp_path, monkeypatch):
    local = resolve_model(str(f32.path), cache_dir=cache_dir)
    assert (local.kind, local.path, local.dtype, local.fingerprint) == ("mlx-dir", f32.path, "float32", f32.fingerprint)
    assert resolve_model(str(quant.path), cache_dir=cache_dir).dtype == "quantized"
    with pytest.raises(ModelSourceError, match="stored as float32"):
        resolve_model(str(f32.path), dtype="float16", cache_dir=cache_dir)

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--test--tiny"
    for rev in ("old", "abc"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    for f in f32.path.iterdir():
        (repo / "snapshots" / "abc" / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    hub = resolve_model("test/tiny", cache_dir=cache_dir)
    assert (hub.kind, hub.path, hub.dtype) == ("hf-cache", repo / "snapshots" / "abc", "float32")
    assert hub.fingerprint == f32.fingerprint  # same contents, different place


def test_missing_sources_are_explained(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelSourceError) as e:
        resolve_model("nobody/nothing", cache_dir=cache_dir)
    assert "no file or directory" in str(e.value) and "models--nobody--nothing" in str(e.value)
    with pytest.raises(ModelSourceError, match="not an HF repo id"):
        resolve_model("/no/such/model.gguf", cache_dir=cache_dir)
    with pytest.raises(ModelSourceError, match="unknown embedded model"):
        resolve_model("embedded:gpt5", cache_dir=cache_dir)
    with pytest.raises(ModelSourceError, match="unknown dtype"):
        resolve_model("embedded:smollm2", dtype="int3", cache_dir=cache_dir)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelSourceError, match="not a GGUF"):
        resolve_model(str(tmp_path / "notes.txt"), cache_dir=cache_dir)
    with pytest.raises(ModelSourceError, match="not an MLX model directory"):
        resolve_model(str(tmp_path), cache_dir=cache_dir)


def test_truncated_gguf_fails_cleanly(gguf_path, tmp_path):
    broken = tmp_path / "broken.gguf"
    with open(gguf_path, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(1 << 20))
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="cannot import GGUF"):
        resolve_model(str(broken), dtype="float32", cache_dir=cache)
    assert not [p for p in (cache / "models").iterdir() if p.is_dir()]  # neither a model nor a temp dir


def _numpy_llama_logits(gguf_file: Path, ids: list[int]) -> np.ndarray:
    """A llama forward pass straight from the GGUF: llama.cpp's q/k layout, interleaved rope."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_file)
    meta = lambda k: reader.fields[k].contents()  # noqa: E731
    W = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
    n_layers, n_heads = meta("llama.block_count"), meta("llama.attention.head_count")
    n_kv = meta("llama.attention.head_count_kv")
    eps, base = np.float32(meta("llama.attention.layer_norm_rms_epsilon")), meta("llama.rope.freq_base")
    embed = W["token_embd.weight"]
    T, hd = len(ids), embed.shape[1] // n_heads

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    angles = (np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(q):  # rotate adjacent pairs (2i, 2i+1)
        a, b = q[..., 0::2], q[..., 1::2]
        out = np.empty_like(q)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    x = embed[ids]
    for i in range(n_layers):
        w = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, w("attn_norm"))
        q = rope((h @ w("attn_q").T).reshape(T, n_heads, hd))
        k = rope((h @ w("attn_k").T).reshape(T, n_kv, hd)).repeat(n_heads // n_kv, axis=1)
        v = (h @ w("attn_v").T).reshape(T, n_kv, hd).repeat(n_heads // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(hd)) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(T, -1) @ w("attn_output").T
        h = norm(x, w("ffn_norm"))
        g = h @ w("ffn_gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    return norm(x, W["output_norm.weight"]) @ W.get("output.weight", embed).T


def test_matches_numpy_reference(f32_loaded, gguf_path):
    model, tokenizer = f32_loaded
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. 12345")
    ref = _numpy_llama_logits(gguf_path, ids)
    ours = np.array(model(mx.array(ids)[None])[0])
    # Measured max |diff| 7e-5 with logits up to ~31.
    assert np.abs(ours - ref).max() < 2e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
