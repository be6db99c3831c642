"""Tiny random-weight GGUF files in real architectures' layouts, written with gguf.GGUFWriter.

Each spec mirrors what llama.cpp's converter and quantizer write for that family: tensor
names, which tensors exist (biases, q/k norms, rope_freqs, a tied or separate output),
the block types a Q4_K_M / Q8_0 / Q4_0 file mixes, and the tokenizer kind. The weights
are random, so only an exact import agrees with a forward pass over the file itself.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 256, 512, 4, 2, 64, 2


def _kquant_blocks(rng, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Random K-quant bytes with small finite scales (gguf cannot quantize K-quants)."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16) first
        data[..., 0:4] = np.array([2e-4, 1e-4], np.float16).view(np.uint8)
    elif qtype == Q.Q6_K:  # d (f16) last
        data[..., 208:210] = np.array([1e-4], np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return data.reshape(rows, -1)


def _tensor(w: GGUFWriter, rng, name: str, shape: tuple, qtype: Q, scale: float = 0.05, center: float = 0.0):
    if qtype in (Q.Q4_K, Q.Q6_K):
        w.add_tensor(name, _kquant_blocks(rng, *shape, qtype), raw_dtype=qtype)
        return
    x = (center + scale * rng.standard_normal(shape)).astype(np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, x)
    elif qtype == Q.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)


SPECS = {
    # Qwen2.5 Q4_K_M: q/k/v biases, tied embeddings, Q4_K with Q6_K for attn_v/ffn_down.
    "qwen2": dict(arch="qwen2", tok="qwen2", bias=True, tied=True, embd=Q.Q8_0,
                  types={"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_K,
                         "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}),
    # Qwen3 Q8_0: per-head q/k RMSNorm, no biases, tied embeddings.
    "qwen3": dict(arch="qwen3", tok="qwen2", qk_norm=True, tied=True, embd=Q.Q8_0,
                  types=dict.fromkeys(["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"], Q.Q8_0)),
    # Mistral 7B Q4_0 (llama architecture, SentencePiece vocabulary, separate Q6_K output).
    "mistral": dict(arch="llama", tok="spm", output=Q.Q6_K, embd=Q.Q4_0,
                    types=dict.fromkeys(["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"], Q.Q4_0)),
    # Llama 3.x Q4_K_M: rope_freqs, llama-bpe tokenizer, Q5_0/Q4_K/Q6_K mix, F16 output.
    "llama3": dict(arch="llama", tok="llama-bpe", rope_freqs=True, output=Q.F16, embd=Q.Q6_K,
                   types={"attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q6_K, "attn_output": Q.Q4_K,
                          "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}),
    # Gemma 3 (as Ollama ships it: the vision tower in the same file): q/k norms, post-norms,
    # norms stored as 1 + w, a sliding window short enough for a 24-token test to cross it.
    # Six layers: five sliding, one global, as Gemma 3 alternates them.
    "gemma3": dict(arch="gemma3", tok="spm", gemma=True, tied=True, embd=Q.Q8_0, layers=6,
                   types={"attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_K,
                          "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K}),
}


def llama3_rope_freqs(base: float, factor=8.0, low=1.0, high=4.0, old_context=64) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3.1 scaling (old_context kept tiny so short tests see it)."""
    inv = base ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    wavelen = 2 * np.pi / inv
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0, 1)
    return (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def gpt2_vocab(specials: list[str]):
    """GPT-2's 256 byte symbols, a few merges, then special tokens."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = [chr(c) for c in cs]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ ĠĠ", "Ġ Ġ", "1 2", "12 3", "e r", "Ġ w", "o r"]
    tokens += ["".join(m.split()) for m in merges if "".join(m.split()) not in tokens]
    return tokens, merges, [1] * len(tokens) + [3] * len(specials), tokens + specials


def spm_vocab():
    """A SentencePiece BPE vocabulary: control tokens, 256 byte tokens, pieces with scores."""
    pieces = ["▁", "e", "t", "h", "a", "o", "n", "s", "r", "i", "l", "d", "w", "c", "f", "▁t", "he", "▁the", "in", "er", "▁a",
              "▁w", "or", "▁wor", "ld", "▁world", "é", "▁c", "af", "▁caf", "▁café"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def write(path, name: str, seed: int = 0) -> None:
    spec = SPECS[name]
    arch = spec["arch"]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    layers = spec.get("layers", LAYERS)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 4096)
    w.add_uint32(f"{arch}.embedding_length", HIDDEN)
    w.add_uint32(f"{arch}.feed_forward_length", FFN)
    w.add_uint32(f"{arch}.attention.head_count", HEADS)
    w.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{arch}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{arch}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    base = 500000.0 if spec.get("rope_freqs") else 1e6 if arch.startswith("qwen") else 10000.0
    w.add_float32(f"{arch}.rope.freq_base", base)
    w.add_uint32(f"{arch}.rope.dimension_count", HEAD_DIM)
    if spec.get("gemma"):
        w.add_uint32(f"{arch}.attention.sliding_window", 8)

    if spec["tok"] == "spm":
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_uint32("tokenizer.ggml.bos_token_id", 1)
        w.add_uint32("tokenizer.ggml.eos_token_id", 2)
        w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        w.add_bool("tokenizer.ggml.add_space_prefix", not spec.get("gemma"))
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>"] if spec["tok"] == "llama-bpe" else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        _, merges, types, tokens = gpt2_vocab(specials)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(spec["tok"])
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        first = len(tokens) - len(specials)
        w.add_uint32("tokenizer.ggml.bos_token_id", first)
        # Qwen: <|endoftext|> is bos and eos, <|im_end|> ends chat turns (eot).
        w.add_uint32("tokenizer.ggml.eos_token_id", first + (spec["tok"] == "llama-bpe"))
        w.add_bool("tokenizer.ggml.add_bos_token", spec["tok"] == "llama-bpe")
        if spec["tok"] == "qwen2":
            w.add_uint32("tokenizer.ggml.eot_token_id", first + 2)
            w.add_string("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    vocab = len(tokens)

    _tensor(w, rng, "token_embd.weight", (vocab, HIDDEN), spec["embd"], scale=0.5)
    _tensor(w, rng, "output_norm.weight", (HIDDEN,), Q.F32, 0.1, 1.0)
    if not spec.get("tied"):
        _tensor(w, rng, "output.weight", (vocab, HIDDEN), spec["output"], scale=0.1)
    if spec.get("rope_freqs"):
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(base))
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"attn_q": (q_rows, HIDDEN), "attn_k": (kv_rows, HIDDEN), "attn_v": (kv_rows, HIDDEN),
              "attn_output": (HIDDEN, q_rows), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(layers):
        for kind, shape in shapes.items():
            _tensor(w, rng, f"blk.{i}.{kind}.weight", shape, spec["types"][kind], scale=0.08)
        for kind in ("attn_norm", "ffn_norm"):
            _tensor(w, rng, f"blk.{i}.{kind}.weight", (HIDDEN,), Q.F32, 0.1, 1.0)
        if spec.get("bias"):
            for kind, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                _tensor(w, rng, f"blk.{i}.{kind}.bias", (rows,), Q.F32, 0.5)
        if spec.get("gemma"):
            for kind in ("post_attention_norm", "post_ffw_norm"):
                _tensor(w, rng, f"blk.{i}.{kind}.weight", (HIDDEN,), Q.F32, 0.1, 1.0)
        if spec.get("qk_norm") or spec.get("gemma"):
            for kind in ("attn_q_norm", "attn_k_norm"):
                _tensor(w, rng, f"blk.{i}.{kind}.weight", (HEAD_DIM,), Q.F32, 0.3, 1.0)
    if spec.get("gemma"):
        _tensor(w, rng, "v.patch_embd.weight", (HIDDEN, 48), Q.F16)
        _tensor(w, rng, "mm.input_projection.weight", (HIDDEN, HIDDEN), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
