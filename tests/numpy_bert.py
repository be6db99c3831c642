"""An independent reference for the embedding tests: sentence-transformers' BERT pipeline in numpy.

Written from the BERT paper and sentence-transformers' modules (Transformer, mean Pooling,
Normalize), sharing no code with daemon/embeddings: float64 throughout, exact erf GELU
(math.erf), softmax and layer norm spelled out, one sentence at a time (no padding).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

_erf = np.vectorize(math.erf)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class NumpyBert:
    def __init__(self, path: Path):
        path = Path(path)
        self.cfg = json.loads((path / "config.json").read_text())
        raw = load_file(str(path / "model.safetensors"))
        self.w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in raw.items()}

    def hidden(self, ids: list[int]) -> np.ndarray:
        w, c = self.w, self.cfg
        eps, heads = c["layer_norm_eps"], c["num_attention_heads"]
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        d = x.shape[1] // heads
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def lin(name, v):
                return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (lin(f"attention.self.{t}", x).reshape(n, heads, d).transpose(1, 0, 2)
                       for t in ("query", "key", "value"))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = (s / s.sum(-1, keepdims=True)) @ v
            a = a.transpose(1, 0, 2).reshape(n, heads * d)
            x = _ln(x + lin("attention.output.dense", a), w[p + "attention.output.LayerNorm.weight"],
                    w[p + "attention.output.LayerNorm.bias"], eps)
            h = lin("intermediate.dense", x)
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = _ln(x + lin("output.dense", h), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        return x

    def embed(self, ids: list[int]) -> np.ndarray:
        """Mean over the tokens, then unit length: the model's Pooling and Normalize modules."""
        v = self.hidden(ids).mean(0)
        return v / np.linalg.norm(v)
