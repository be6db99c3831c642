"""Convert a GGUF file into an mlx-lm model directory.

GGUF lacks what mlx-lm reads (an HF-style config.json, HF tensor names, tokenizer.json);
all three are rebuilt from the file, guided by the architecture's table (`archs.py`).
Weights are dequantized exactly in float32 and cast to the requested dtype, except that
`quantized` keeps the block types MLX holds losslessly (Q8_0, Q4_0, Q4_1) packed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import tokenizer
from .archs import ARCHS, TOP, Arch
from .reader import GROUP_SIZE, GGUFFile

log = logging.getLogger("mlxd.gguf")

# Bump when the output for the same GGUF changes; it is part of the cache key.
# 2: read through the `gguf` package (K-quants, Q5_0, ...), more architectures, SentencePiece.
IMPORTER_VERSION = 2

DTYPES = ("float32", "float16", "bfloat16", "quantized")
MAX_SHARD_BYTES = 5 << 30

__all__ = ["ARCHS", "DTYPES", "IMPORTER_VERSION", "import_gguf"]


def import_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> Path:
    """Write an mlx-lm directory for `gguf_path` at `out_dir` and return it.

    The directory is built next to `out_dir` and renamed into place, so readers
    see either nothing or a complete model. Raises FileExistsError if `out_dir`
    already exists (e.g. another process finished the same import first).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if out_dir.exists():
        raise FileExistsError(out_dir)

    f = GGUFFile(gguf_path)
    name = f.get("general.architecture")
    if name not in ARCHS:
        raise ValueError(f"{gguf_path}: architecture {name!r} is not supported (only {', '.join(ARCHS)})")
    arch = ARCHS[name]
    config = _config(f, arch, name)
    weights, quantization = _weights(f, arch, config, dtype)
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    config["torch_dtype"] = "float16" if dtype == "quantized" else dtype
    get = f.get
    tok, tokenizer_config, special_map = tokenizer.build(get, config["max_position_embeddings"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _save_weights(tmp, weights)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(config))
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", special_map)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if out_dir.exists():
                raise FileExistsError(out_dir) from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _config(f: GGUFFile, arch: Arch, name: str) -> dict:
    get = lambda key, default=None: f.get(f"{name}.{key}", default)  # noqa: E731
    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // n_heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError("different key and value head sizes are not supported")
    if not isinstance(n_heads, int) or not isinstance(get("attention.head_count_kv", n_heads), int):
        raise ValueError("per-layer head counts are not supported")
    config = {
        "model_type": arch.model_type,
        "architectures": [arch.architectures],
        "hidden_act": arch.hidden_act,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        # GGUF stores eps/theta as float32; round away the float32 noise (9.9999997e-06).
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "rope_theta": float(f"{get('rope.freq_base', 10000.0):.7g}"),
        "max_position_embeddings": get("context_length", 4096),
        "vocab_size": f.tensors["token_embd.weight"].shape[0],
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise ValueError(f"rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in f.tensors:
        # Llama 3.1+: llama.cpp divides each rope frequency by a stored factor. mlx-lm's
        # "longrope" does exactly that with its long factors (and no attention scaling
        # when the original context equals the context).
        if scaling not in (None, "none"):
            raise ValueError("rope_freqs together with rope scaling is not supported")
        factors = [float(x) for x in f.dequantized("rope_freqs.weight").reshape(-1)]
        config["rope_scaling"] = {
            "type": "longrope",
            "long_factor": factors,
            "short_factor": factors,
            "original_max_position_embeddings": config["max_position_embeddings"],
        }
    for key in ("bos", "eos", "pad"):
        gguf_key = "padding" if key == "pad" else key
        if (token_id := f.get(f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
            config[f"{key}_token_id"] = token_id
    # Chat models may end turns with a separate end-of-turn token; stop on both.
    eot = f.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot != config.get("eos_token_id"):
        config["eos_token_id"] = [config["eos_token_id"], eot] if "eos_token_id" in config else eot
    config.update(arch.extra(get, config))
    return config


def _hf_name(arch: Arch, key: str) -> tuple[str, str]:
    """(HF name, the GGUF layer tensor kind or '') for a GGUF tensor name."""
    base, _, suffix = key.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and (layer := arch.layer_name(parts[2])):
        return f"model.layers.{parts[1]}.{layer}.{suffix}", parts[2]
    if base in TOP:
        return f"{TOP[base]}.{suffix}", ""
    raise ValueError(f"unexpected GGUF tensor {key!r}")


def _unpermute(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation (interleaved-rope layout -> HF halves).

    It only reorders output rows, so it applies unchanged to packed quantized
    weights, their scales and biases, and to 1-D projection biases.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _weights(f: GGUFFile, arch: Arch, config: dict, dtype: str) -> tuple[dict, dict | None]:
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    float_dtype = mx.float16 if dtype == "quantized" else getattr(mx, dtype)
    out, bits, unpacked = {}, {}, Counter()
    skipped = [k for k in f.tensors if k.startswith(arch.skip or "\0")]
    if skipped:
        log.info("left out %d tensors a text model does not use (%s...)", len(skipped), skipped[0])
    for key in f.tensors:
        if key == "rope_freqs.weight" or key in skipped:
            continue  # rope_freqs is in config.json's rope_scaling
        name, kind = _hf_name(arch, key)
        rows = (lambda w: _unpermute(w, heads[kind])) if arch.permute_qk and kind in heads else (lambda w: w)
        packed = f.packed(key) if dtype == "quantized" and key.endswith(".weight") else None
        if packed is not None:
            module = name.removesuffix(".weight")
            w, scales, biases, bits[module] = packed
            # float16 is what MLX gives GGUF scales; the rest follows so activations stay float16.
            out[name], out[f"{module}.scales"], out[f"{module}.biases"] = (mx.array(rows(a)) for a in (w, scales, biases))
            continue
        if dtype == "quantized" and len(f.tensors[key].shape) == 2:
            unpacked[f.type_name(key)] += 1
        w = f.dequantized(key)
        if arch.norm_offset and key.endswith("norm.weight"):
            w = w - np.float32(arch.norm_offset)
        out[name] = mx.array(rows(w)).astype(float_dtype)
    if unpacked:
        log.info("kept %d matrices packed; dequantized to float16 (no lossless MLX layout): %s",
                 len(bits), ", ".join(f"{n} x{c}" for n, c in sorted(unpacked.items())))
    if not bits:
        return out, None
    common = Counter(bits.values()).most_common(1)[0][0]
    quantization = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for module, b in sorted(bits.items()):
        quantization[module] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return out, quantization


def _save_weights(path: Path, weights: dict) -> None:
    shards, size = [], 0
    for k in sorted(weights):
        v = weights[k]
        if not shards or size + v.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(path / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for v in weights.values())
    _write_json(path / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _generation_config(config: dict) -> dict:
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
