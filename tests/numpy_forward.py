"""An independent forward pass over a GGUF, in numpy, with llama.cpp's semantics.

It dequantizes with the `gguf` package (llama.cpp's code) and follows llama.cpp's graph: llama-family Q/K rows stay permuted and take interleaved ("normal")
rope, the others take NeoX rope; Gemma 3's norms are used as stored (1 + w baked in),
its sliding layers use a 10K rope base and a windowed mask. Nothing here comes from the
importer but the header reader (`GGUFFile`, which test_gguf_reader.py checks byte for
byte against the `gguf` package's GGUFReader, ~100x slower on Gemma's 262K-token
vocabulary), so a wrong name map, permutation, norm offset or config value shows up as
a logit difference.
"""

from __future__ import annotations

import numpy as np
from gguf.quants import dequantize

from daemon.models.gguf.reader import GGUFFile

NEOX = {"qwen2", "qwen3", "gemma3"}


def read(path):
    f = GGUFFile(path)
    weights = {t.name: np.asarray(dequantize(np.asarray(t.data), t.type), np.float32).reshape(t.shape)
               for t in f.tensors.values()}
    return f.meta, weights


def logits(path, ids: list[int], loaded=None) -> np.ndarray:
    meta, W = loaded or read(path)
    arch = meta["general.architecture"]
    m = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    n_layers, n_heads = m("block_count"), m("attention.head_count")
    n_kv = m("attention.head_count_kv", n_heads)
    eps, base = np.float32(m("attention.layer_norm_rms_epsilon")), m("rope.freq_base", 10000.0)
    embed = W["token_embd.weight"]
    hd = m("attention.key_length", embed.shape[1] // n_heads)
    T = len(ids)
    gemma = arch == "gemma3"
    window = m("attention.sliding_window")

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(q, theta):
        inv = theta ** (-np.arange(0, hd, 2) / hd) / W.get("rope_freqs.weight", np.ones(hd // 2))
        ang = (np.arange(T)[:, None] * inv).astype(np.float32)
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        if arch in NEOX:  # rotate (i, i + hd/2)
            a, b = q[..., : hd // 2], q[..., hd // 2:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
        a, b = q[..., 0::2], q[..., 1::2]  # rotate adjacent pairs (2i, 2i+1)
        out = np.empty_like(q)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    pos = np.arange(T)
    causal = np.where(pos[None, :] > pos[:, None], -np.inf, 0).astype(np.float32)
    local = np.where(pos[:, None] - pos[None, :] >= (window or T + 1), -np.inf, causal).astype(np.float32)
    x = embed[ids]
    if gemma:
        x = x * np.float32(np.sqrt(embed.shape[1]))
    for i in range(n_layers):
        w = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        b = lambda n: W.get(f"blk.{i}.{n}.bias", 0)  # noqa: E731
        sliding = gemma and i % 6 < 5
        h = norm(x, w("attn_norm"))
        q = (h @ w("attn_q").T + b("attn_q")).reshape(T, n_heads, hd)
        k = (h @ w("attn_k").T + b("attn_k")).reshape(T, n_kv, hd)
        v = (h @ w("attn_v").T + b("attn_v")).reshape(T, n_kv, hd)
        if f"blk.{i}.attn_q_norm.weight" in W:
            q, k = norm(q, w("attn_q_norm")), norm(k, w("attn_k_norm"))
        theta = 10000.0 if sliding else base
        q, k = rope(q, theta), rope(k, theta)
        k, v = k.repeat(n_heads // n_kv, axis=1), v.repeat(n_heads // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(hd)) + (local if sliding else causal)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p, v).reshape(T, -1) @ w("attn_output").T
        x = x + (norm(o, w("post_attention_norm")) if gemma else o)
        h = norm(x, w("ffn_norm"))
        g = h @ w("ffn_gate").T
        act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) if gemma else g / (1 + np.exp(-g))
        o = (act * (h @ w("ffn_up").T)) @ w("ffn_down").T
        x = x + (norm(o, w("post_ffw_norm")) if gemma else o)
    return norm(x, W["output_norm.weight"]) @ W.get("output.weight", embed).T
