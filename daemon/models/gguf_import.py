"""Convert a llama-architecture GGUF into an mlx-lm model directory.

MLX reads GGUF natively and keeps Q4_0/Q4_1/Q8_0 tensors packed in its own
affine layout (group size 32), so "quantized" is a lossless repack and the
float dtypes are a plain dequantize. What GGUF lacks is an HF-style config and
tokenizer.json; both are rebuilt from the metadata here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx

# Bump when the output for the same GGUF changes; it is part of the cache key.
IMPORTER_VERSION = 1

DTYPES = ("float32", "float16", "bfloat16", "quantized")

GROUP_SIZE = 32  # every GGUF block type MLX keeps packed has 32 weights per block
MAX_SHARD_BYTES = 5 << 30

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


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

    tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{gguf_path}: llama3-style rope_freqs scaling is not supported")

    config = _config(meta, tensors)
    weights = _weights(tensors, config)
    weights, quantization = _cast(weights, dtype)
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    config["torch_dtype"] = "float16" if dtype == "quantized" else dtype
    tokenizer, tokenizer_config, special_map = _tokenizer(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _save_weights(tmp, weights)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(config))
        tokenizer.save(str(tmp / "tokenizer.json"))
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


def _scalar(meta, key, default=None):
    v = meta.get(key, default)
    return v.item() if isinstance(v, mx.array) else v


def _config(meta, tensors) -> dict:
    p = "llama."
    n_heads = _scalar(meta, p + "attention.head_count")
    hidden = _scalar(meta, p + "embedding_length")
    head_dim = _scalar(meta, p + "attention.key_length", hidden // n_heads)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": _scalar(meta, p + "feed_forward_length"),
        "num_hidden_layers": _scalar(meta, p + "block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _scalar(meta, p + "attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        # GGUF stores eps/theta as float32; round away the float32 noise (9.9999997e-06).
        "rms_norm_eps": float(f"{_scalar(meta, p + 'attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "rope_theta": float(f"{_scalar(meta, p + 'rope.freq_base', 10000.0):.7g}"),
        "max_position_embeddings": _scalar(meta, p + "context_length", 4096),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if _scalar(meta, p + "rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    scaling = meta.get(p + "rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _scalar(meta, p + "rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise ValueError(f"rope scaling {scaling!r} is not supported")
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if (token_id := _scalar(meta, f"tokenizer.ggml.{key}")) is not None:
            config[f"{name}_token_id"] = token_id
    # Chat models may end turns with a separate end-of-turn token; stop on both.
    eot = _scalar(meta, "tokenizer.ggml.eot_token_id")
    if eot is not None and eot != config.get("eos_token_id"):
        config["eos_token_id"] = [config["eos_token_id"], eot] if "eos_token_id" in config else eot
    return config


def _unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (interleaved-rope layout -> HF halves).

    It only reorders output rows, so it applies unchanged to packed quantized
    weights, their scales and biases, and to 1-D projection biases.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _weights(tensors: dict, config: dict) -> dict:
    """GGUF names -> HF names, with q/k rows back in HF order."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for key, value in tensors.items():
        base, _, suffix = key.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
            if parts[2] in heads:
                value = _unpermute(value, heads[parts[2]])
        elif base in _TOP_NAMES:
            name = _TOP_NAMES[base]
        else:
            raise ValueError(f"unexpected GGUF tensor {key!r}")
        out[f"{name}.{suffix}"] = value
    return out


def _cast(weights: dict, dtype: str) -> tuple[dict, dict | None]:
    """Dequantize to a float dtype, or keep packed tensors and describe them per layer."""
    packed = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    bits = {m: weights[f"{m}.weight"].shape[-1] // weights[f"{m}.scales"].shape[-1] for m in packed}
    is_packed = lambda k: k.rpartition(".")[0] in bits and k.endswith((".weight", ".scales", ".biases"))  # noqa: E731
    if dtype == "quantized":
        # float16 is what MLX gives GGUF scales; the rest follows so activations stay float16.
        out = {k: v if is_packed(k) else v.astype(mx.float16) for k, v in weights.items()}
        if not packed:
            return out, None
        common = Counter(bits.values()).most_common(1)[0][0]
        quantization = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
        for m in packed:
            quantization[m] = {"group_size": GROUP_SIZE, "bits": bits[m], "mode": "affine"}
        return out, quantization

    float_dtype = getattr(mx, dtype)
    out = {}
    for k, v in weights.items():
        module = k.rpartition(".")[0]
        if not is_packed(k):
            out[k] = v.astype(float_dtype)
        elif k.endswith(".weight"):
            # Dequantize in float32: MLX would otherwise round in the float16 scales' dtype.
            scales = weights[f"{module}.scales"].astype(mx.float32)
            biases = weights[f"{module}.biases"].astype(mx.float32)
            w = mx.dequantize(v, scales, biases, group_size=GROUP_SIZE, bits=bits[module])
            out[k] = w.astype(float_dtype)
    return out, None


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


def _tokenizer(meta):
    """Byte-level BPE tokenizer.json plus the HF config files that describe it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer {kind!r} is not supported (only byte-level BPE 'gpt2')")
    # llama.cpp's pre-tokenizer by name. ByteLevel's regex is GPT-2's; "smollm" splits digits first.
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        pre_tokenizer = byte_level
    elif pre == "smollm":
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (only 'gpt2' and 'smollm')")

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()

    # Control tokens are special (skipped when decoding with skip_special_tokens);
    # user-defined ones are matched whole but kept in decoded text, as in llama.cpp.
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def token(key):
        i = _scalar(meta, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and "bos_token" in specials) or (add_eos and "eos_token" in specials):
        bos = [specials["bos_token"]] if add_bos and "bos_token" in specials else []
        eos = [specials["eos_token"]] if add_eos and "eos_token" in specials else []
        tok.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos,
            pair=bos + ["$A"] + eos + bos + ["$B"] + eos,
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(bos + eos)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _scalar(meta, "llama.context_length", 4096),
    }
    if template := meta.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = template
    special_map = {**specials, "additional_special_tokens": [t.content for t in control if t.content not in specials.values()]}
    return tok, tokenizer_config, special_map


def _generation_config(config: dict) -> dict:
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
