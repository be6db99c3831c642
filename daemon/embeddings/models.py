"""Token ids in, pooled vectors out: our BERT encoder, or an mlx-lm decoder's hidden states.

Batches are right-padded. For an encoder the padding is masked out of attention; a
decoder's causal mask already keeps every real token from seeing the padding after it,
so mlx-lm's own model classes serve as they are (the inner model's output is the final
normed hidden state, what `last_hidden_state` is for Qwen3-Embedding and its kind).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from .spec import EmbedSpec, SpecError


def pool(h: mx.array, mask: mx.array, lengths: mx.array, how: str) -> mx.array:
    """[B, L, D] hidden states -> [B, D] by mean over real tokens, the first token, or the last real one."""
    if how == "cls":
        return h[:, 0]
    if how == "last":
        return mx.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    m = mask.astype(h.dtype)[:, :, None]
    return (h * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)


class Embedder:
    """One forward pass over a batch of token-id rows; float32 vectors, normalised if the spec says."""

    def __init__(self, path: Path, spec: EmbedSpec, dtype: str):
        self.spec = spec
        # float32 on a CPU device (MLX's CPU half-precision kernels are slow); the weights' own dtype on Metal
        on_cpu = not mx.metal.is_available()
        self.dtype = mx.float32 if on_cpu or dtype in ("auto", "float32", "quantized") else getattr(mx, dtype)
        if spec.arch == "bert":
            from .bert import Bert
            self.model = Bert(path, self.dtype)
            self.vocab_size = self.model.vocab_size
            self._hidden = self.model
        else:
            from mlx_lm.utils import load_model
            model, config = load_model(Path(path))
            inner = getattr(model, "model", None)
            if not callable(inner):
                raise SpecError(f"mlx-lm's {spec.model_type} model has no inner model whose hidden states "
                                "could be pooled; it cannot serve embeddings")
            if dtype != "quantized" or on_cpu:
                model.set_dtype(self.dtype)
            self.model = model
            self.vocab_size = int(config.get("vocab_size") or model.args.vocab_size)
            self._hidden = lambda ids, mask: inner(ids)

    def __call__(self, rows: list[list[int]]) -> np.ndarray:
        lengths = [len(r) for r in rows]
        width = max(lengths)
        ids = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        lens = mx.array(lengths)
        mask = mx.arange(width)[None, :] < lens[:, None]
        h = self._hidden(mx.array(ids), mask)
        v = pool(h, mask, lens, self.spec.pooling).astype(mx.float32)
        if self.spec.normalize:
            v = v / mx.maximum(mx.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        return np.array(v)
