"""A BERT encoder in plain MLX ops: the forward pass of sentence-transformers' BERT models.

Our own (about a hundred lines) rather than mlx-embeddings, which pulls in mlx-vlm and
transformers 5 (docs/architecture.md). Written for a CPU device too: Q, K and V are one
matmul, weights are transposed once at load, attention is written out with an additive
padding mask (MLX's fused attention is no faster here for short rows).

MLX's CPU exp costs about 26 ns an element (numpy's, vectorized, about 1.2), and GELU and
softmax are one exp per element of the two largest activations: they took two thirds of a
CPU forward pass. So GELU's erf is a rational function with no exp at all (Eigen's and
XLA's float32 erf, max error ~1e-7), which MLX compiles into one elementwise kernel; and on
a CPU device the softmax's exp runs in numpy, its normalisation deferred to the [L, D]
context rather than the [L, L] weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (erf(4) is 1 to float32 precision); Eigen's generic_fast_erf_float
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _horner(coefs, x):
    y = coefs[0]
    for c in coefs[1:]:
        y = y * x + c
    return y


def _erf(x: mx.array) -> mx.array:
    x = mx.minimum(mx.maximum(x, -4.0), 4.0)
    x2 = x * x
    return x * _horner(_ERF_P, x2) / _horner(_ERF_Q, x2)


@mx.compile
def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU BERT is trained with."""
    return 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))


def attend(scores: mx.array, bias: mx.array, v: mx.array, on_cpu: bool) -> mx.array:
    """softmax(scores + bias) @ v; on a CPU device the mask and exp run in numpy, in place
    (see the module's docstring)."""
    if not on_cpu:
        return mx.softmax(scores + bias, axis=-1) @ v
    mx.eval(scores, bias)
    e = np.add(np.asarray(scores), np.asarray(bias))
    e -= e.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    return (mx.array(e) @ v) / mx.array(e.sum(axis=-1, keepdims=True))


class Bert:
    """BertModel's hidden states for a right-padded batch (`ids`, `mask` of shape [B, L])."""

    def __init__(self, path: Path, dtype=mx.float32):
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT with {cfg['position_embedding_type']} position embeddings is not supported")
        act = cfg.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_python"):
            raise ValueError(f"BERT with activation {act!r} is not supported (gelu only)")
        self.heads = int(cfg["num_attention_heads"])
        self.hidden = int(cfg["hidden_size"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.vocab_size = int(cfg["vocab_size"])
        self.max_positions = int(cfg.get("max_position_embeddings", 512))
        self.on_cpu = mx.default_device() == mx.cpu
        w = {}
        for f in sorted(path.glob("*.safetensors")):
            w.update(mx.load(str(f)))
        w = {k.removeprefix("bert."): v for k, v in w.items()}

        def get(name):
            if name not in w:
                raise ValueError(f"{path}: weight {name!r} is missing")
            return w[name].astype(dtype)

        self.word = get("embeddings.word_embeddings.weight")
        self.pos = get("embeddings.position_embeddings.weight")
        self.type0 = get("embeddings.token_type_embeddings.weight")[0]
        self.ln0 = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            att = p + "attention.self."
            qkv_w = mx.concatenate([get(att + n + ".weight") for n in ("query", "key", "value")], axis=0)
            qkv_b = mx.concatenate([get(att + n + ".bias") for n in ("query", "key", "value")], axis=0)
            self.layers.append({
                "qkv": (mx.contiguous(qkv_w.T), qkv_b),
                "out": (mx.contiguous(get(p + "attention.output.dense.weight").T), get(p + "attention.output.dense.bias")),
                "ln1": (get(p + "attention.output.LayerNorm.weight"), get(p + "attention.output.LayerNorm.bias")),
                "up": (mx.contiguous(get(p + "intermediate.dense.weight").T), get(p + "intermediate.dense.bias")),
                "down": (mx.contiguous(get(p + "output.dense.weight").T), get(p + "output.dense.bias")),
                "ln2": (get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias")),
            })
        mx.eval(self.word, self.pos, self.type0, self.ln0, self.layers)

    def _ln(self, x, wb):
        return mx.fast.layer_norm(x, wb[0], wb[1], self.eps)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        B, L = ids.shape
        H, D = self.heads, self.hidden // self.heads
        x = self._ln(self.word[ids] + self.pos[:L] + self.type0, self.ln0)
        bias = ((mask.astype(x.dtype) - 1.0) * 1e9)[:, None, None, :]       # 0 where real, -1e9 on padding
        scale = D ** -0.5
        for lay in self.layers:
            qkv = mx.addmm(lay["qkv"][1], x, lay["qkv"][0]).reshape(B, L, 3, H, D).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q * scale) @ k.transpose(0, 1, 3, 2)
            ctx = attend(scores, bias, v, self.on_cpu).transpose(0, 2, 1, 3).reshape(B, L, H * D)
            x = self._ln(x + mx.addmm(lay["out"][1], ctx, lay["out"][0]), lay["ln1"])
            h = gelu(mx.addmm(lay["up"][1], x, lay["up"][0]))
            x = self._ln(x + mx.addmm(lay["down"][1], h, lay["down"][0]), lay["ln2"])
        return x
