"""qwen2, qwen3, Mistral, Llama 3 and small Gemma 3 GGUFs (no real file here): tiny random-weight files in
each family's real layout and block types, imported and checked against an independent
numpy forward pass over the same file (tests/numpy_forward.py).

Random weights leave nothing to chance: a wrong name map, a missing or extra Q/K
un-permutation, a norm offset, a bias or q/k-norm dropped, or rope_freqs ignored each
move the logits far past the tolerance (the float32 import agrees to ~1e-5).
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import numpy_forward
import tiny_gguf
from daemon.models import ModelSourceError, resolve_model
from daemon.models.gguf import import_gguf

IDS = [5, 71, 300, 12, 99, 255, 3, 140, 200, 17, 64, 250, 33, 8, 180, 41, 120, 7, 222, 90, 1, 60, 130, 77]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gguf")
    out = {}
    for name in tiny_gguf.SPECS:
        tiny_gguf.write(d / f"{name}.gguf", name)
        out[name] = d / f"{name}.gguf"
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _load(path):
    from mlx_lm import load

    return load(str(path))


def _ids(model):
    vocab = model.args.vocab_size
    return [i % vocab for i in IDS]


@pytest.mark.parametrize("name", list(tiny_gguf.SPECS))
def test_float32_import_matches_numpy_reference(files, cache, name):
    resolved = resolve_model(str(files[name]), dtype="float32", cache_dir=cache)
    model, _ = _load(resolved.path)
    expected_type = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "llama3": "llama", "gemma3": "gemma3_text"}[name]
    assert model.model_type == expected_type
    ids = _ids(model)
    ref = numpy_forward.logits(files[name], ids)
    ours = np.array(model(mx.array(ids)[None])[0])
    scale = np.abs(ref).max()
    assert scale > 1  # random weights give logits of a few units: a meaningful comparison
    # Measured ~1e-6 relative; a missing permute, bias, q/k norm or rope_freqs gives > 1e-2.
    assert np.abs(ours - ref).max() / scale < 1e-4, np.abs(ours - ref).max() / scale
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name, bits", [("qwen3", 8), ("mistral", 4)])
def test_quantized_import_keeps_blocks_packed(files, cache, name, bits):
    """Q8_0 and Q4_0 stay packed, losslessly: every packed matrix dequantizes to exactly
    the float32 import's (which the test above holds to the numpy reference)."""
    resolved = resolve_model(str(files[name]), dtype="quantized", cache_dir=cache)
    config = json.loads((resolved.path / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 32
    packed = mx.load(str(resolved.path / "model.safetensors"))
    exact = mx.load(str(resolve_model(str(files[name]), dtype="float32", cache_dir=cache).path / "model.safetensors"))
    modules = [k.removesuffix(".scales") for k in packed if k.endswith(".scales")]
    assert len(modules) == 1 + 7 * tiny_gguf.LAYERS  # the embedding and every layer matrix
    for m in modules:
        w = mx.dequantize(packed[f"{m}.weight"], packed[f"{m}.scales"].astype(mx.float32),
                          packed[f"{m}.biases"].astype(mx.float32), group_size=32, bits=bits)
        assert mx.array_equal(w, exact[f"{m}.weight"]).item(), m
    model, _ = _load(resolved.path)
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits
    model.set_dtype(mx.float32)
    ids = _ids(model)
    ref = numpy_forward.logits(files[name], ids)
    ours = np.array(model(mx.array(ids)[None])[0])
    # The rest (norms, Mistral's Q6_K output) is float16 here: measured 1e-3 relative.
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 5e-3


def test_quantized_import_dequantizes_k_quants(files, cache, caplog):
    """Q4_K, Q5_0 and Q6_K have no lossless MLX layout: they come out as float16 matrices,
    whose forward pass (in float32) is the numpy reference's over the file itself."""
    caplog.set_level("INFO", logger="mlxd.gguf")
    resolved = resolve_model(str(files["llama3"]), dtype="quantized", cache_dir=cache)
    config = json.loads((resolved.path / "config.json").read_text())
    assert "quantization" not in config  # no Q8_0/Q4_0/Q4_1 matrix in this file
    assert "Q4_K x6" in caplog.text and "Q6_K x" in caplog.text and "Q5_0 x4" in caplog.text
    model, _ = _load(resolved.path)
    assert model.layers[0].mlp.down_proj.weight.dtype == mx.float16      # a Q6_K matrix, dequantized
    model.set_dtype(mx.float32)
    ids = _ids(model)
    # The reference over the file's weights as the import stores them: rounded to float16
    # (rope_freqs goes to config.json as float32).
    meta, weights = numpy_forward.read(files["llama3"])
    rounded = {k: v if k == "rope_freqs.weight" else v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    ref = numpy_forward.logits(files["llama3"], ids, loaded=(meta, rounded))
    ours = np.array(model(mx.array(ids)[None])[0])
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    # Measured 3e-6; the unrounded reference is 5e-3 away, a wrong scale or sub-block far more.
    assert err < 1e-4, err
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name, bits", [("qwen3", 8), ("mistral", 4)])
def test_quantized_import_in_float16_activations(files, cache, name, bits):
    """What Metal runs (tests elsewhere switch CPU runs to float32, where MLX's float16
    quantized matmul is slow): packed Q8_0/Q4_0 weights with float16 activations throughout,
    held to the numpy reference within float16's rounding."""
    model, _ = _load(resolve_model(str(files[name]), dtype="quantized", cache_dir=cache).path)
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits and q_proj.scales.dtype == mx.float16
    ids = _ids(model)
    logits = model(mx.array(ids)[None])[0]
    assert logits.dtype == mx.float16
    ours, ref = np.array(logits.astype(mx.float32)), numpy_forward.logits(files[name], ids)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    # Measured 9e-3 (Q8_0) and 1.1e-2 (Q4_0), 23 and 24 of 24 top-1 agreeing (CPU); float32
    # activations are 1e-3 away, bfloat16 ones or a float16 overflow far more.
    assert err < 3e-2, err
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.875


def test_llama3_rope_freqs_become_longrope(files, cache):
    resolved = resolve_model(str(files["llama3"]), dtype="float32", cache_dir=cache)
    config = json.loads((resolved.path / "config.json").read_text())
    factors = tiny_gguf.llama3_rope_freqs(500000.0)
    assert config["rope_scaling"]["type"] == "longrope"
    assert np.allclose(config["rope_scaling"]["long_factor"], factors) and factors.max() > 7  # really scaled
    assert not any("rope_freqs" in k for k in mx.load(str(resolved.path / "model.safetensors")))


def test_tokenizers(files, cache):
    from mlx_lm import load

    text = "In 2024, 12345 naïve cafés served 東京 crème brûlée 🤖 — Привет!\n\n  the world"
    for name in ("qwen2", "llama3", "mistral"):
        _, tok = load(str(resolve_model(str(files[name]), dtype="float32", cache_dir=cache).path))
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text, name
    _, llama3 = load(str(resolve_model(str(files["llama3"]), dtype="float32", cache_dir=cache).path))
    _, qwen2 = load(str(resolve_model(str(files["qwen2"]), dtype="float32", cache_dir=cache).path))
    # llama-bpe groups digits by three, qwen2 splits them one by one; "123" is one merged token.
    pieces = lambda tok, s: [tok.decode([i]) for i in tok.encode(s, add_special_tokens=False)]  # noqa: E731
    assert pieces(llama3, "12345") == ["123", "4", "5"]
    assert pieces(qwen2, "12345") == ["1", "2", "3", "4", "5"]
    assert llama3.encode("hi")[0] == llama3.bos_token_id and qwen2.encode("hi")[0] != qwen2.bos_token_id
    # Qwen ends chat turns with <|im_end|>: eot joins eos as a stop token.
    assert set(qwen2.eos_token_ids) == {qwen2.convert_tokens_to_ids("<|endoftext|>"), qwen2.convert_tokens_to_ids("<|im_end|>")}


def test_unsupported_architecture_is_explained(tmp_path):
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "x.gguf"), "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelSourceError, match="architecture 'rwkv6' is not supported"):
        resolve_model(str(tmp_path / "x.gguf"), dtype="float32", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="dtype"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out", "int4")
