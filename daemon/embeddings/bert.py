"""A BERT encoder in plain MLX ops: the forward pass of sentence-transformers' BERT models.

Our own (about a hundred lines) rather than mlx-embeddings, which pulls in mlx-vlm and
transformers 5 (docs/architecture.md). Q, K and V are one matmul, weights are transposed
once at load, attention is written out with an additive padding mask.

On a CPU device MLX runs each stream's ops on one thread, its exp costs about 26 ns an
element (numpy's about 1.2) and its batched matmul over [B, H, L, D] heads is far from BLAS
speed. So there the forward pass is cut in two: everything that works token by token (the
projections, layer norms, GELU) runs in MLX on one CPU stream per core, each over its own
slice of the batch's tokens, with BLAS on one thread; attention runs in numpy, one batch row
(or a share of its heads) per thread over its real tokens only (its [H, n, n] scores stay in
cache, no mask pass), its softmax normalisation deferred to the [n, D] context. GELU's erf is
a rational function with no exp at all (Eigen's and XLA's float32 erf, max error ~1e-7),
which MLX compiles into one elementwise kernel. On 2 cores a [8, 256] forward of
all-MiniLM-L6-v2 went from about 614 ms to about 330 ms (in-process, min of 5), with the same
outputs to 6e-6; on Metal the forward is plain MLX.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
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


def cpu_cores() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:        # macOS
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads for attention's rows: numpy releases the GIL in its loops and in BLAS."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(cpu_cores(), thread_name_prefix="bert-attention")
    return _POOL


def one_blas_thread() -> None:
    """Every BLAS in the process (MLX's and numpy's) on one thread: the cores are shared out by
    our own slices and rows instead, and a BLAS splitting each of them again lost 20-40%."""
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().limit(limits=1, user_api="blas")


def attention_numpy(blocks: list[np.ndarray], lengths: list[np.ndarray], heads: int, scale: float) -> list[np.ndarray]:
    """softmax(Q K^T * scale) V over each row's real tokens, for blocks of right-padded rows (qkv
    [Bi, L, 3 * H * D], lengths [Bi]) -> [Bi * L, H * D], one row per task over all the blocks
    (or, with fewer rows than threads, a share of a row's heads per task). Padding is cut off
    rather than masked (the same result: a masked key weighs exp(-1e9) = 0), and its own
    positions come out zero: nothing reads them but the next layer's padding."""
    outs, rows = [], []
    for qkv, ns in zip(blocks, lengths):
        Bi, L, width = qkv.shape
        D = width // (3 * heads)
        out = np.zeros((Bi, L, heads, D), np.float32)
        outs.append(out)
        rows += [(qkv[r, :n].reshape(n, 3, heads, D), out[r, :n]) for r in range(Bi) if (n := int(ns[r]))]
    split = -(-cpu_cores() // len(rows)) if rows else 1         # head groups per row
    cuts = [heads * i // split for i in range(split + 1)]
    jobs = [(a[:, :, h0:h1], out[:, h0:h1]) for a, out in rows for h0, h1 in zip(cuts, cuts[1:]) if h1 > h0]

    def attend(job) -> None:
        a, out = job
        q = a[:, 0].transpose(1, 0, 2) * np.float32(scale)                 # [H, n, D]
        s = np.matmul(q, a[:, 1].transpose(1, 2, 0))                       # [H, n, n]
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        c = np.matmul(s, np.ascontiguousarray(a[:, 2].transpose(1, 0, 2)))   # [H, n, D]
        c /= s.sum(axis=-1, keepdims=True)
        out[:] = c.transpose(1, 0, 2)

    list(_pool().map(attend, jobs))
    return [o.reshape(o.shape[0] * o.shape[1], -1) for o in outs]


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
        self._streams = None        # the CPU streams of `_forward_cpu`, made on its first call
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
        return self._forward_cpu(ids, mask) if self.on_cpu else self._forward(ids, mask)

    def _forward(self, ids: mx.array, mask: mx.array) -> mx.array:
        B, L = ids.shape
        H, D = self.heads, self.hidden // self.heads
        x = self._ln(self.word[ids] + self.pos[:L] + self.type0, self.ln0)
        bias = ((mask.astype(x.dtype) - 1.0) * 1e9)[:, None, None, :]       # 0 where real, -1e9 on padding
        for lay in self.layers:
            qkv = mx.addmm(lay["qkv"][1], x, lay["qkv"][0]).reshape(B, L, 3, H, D).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q * D ** -0.5) @ k.transpose(0, 1, 3, 2) + bias
            ctx = (mx.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, L, H * D)
            x = self._ln(x + mx.addmm(lay["out"][1], ctx, lay["out"][0]), lay["ln1"])
            h = gelu(mx.addmm(lay["up"][1], x, lay["up"][0]))
            x = self._ln(x + mx.addmm(lay["down"][1], h, lay["down"][0]), lay["ln2"])
        return x

    def _forward_cpu(self, ids: mx.array, mask: mx.array) -> mx.array:
        """The same forward pass, cut for a CPU device (see the module's docstring): whole batch
        rows per stream when there are enough of them, else slices of one row's tokens."""
        if self._streams is None:
            one_blas_thread()
            self._streams = [mx.new_stream(mx.cpu) for _ in range(cpu_cores())]
        B, L = ids.shape
        n, H = B * L, self.heads
        scale = (self.hidden // H) ** -0.5
        lengths = np.asarray(mask).sum(axis=1)                                   # right-padded rows
        by_rows = B >= len(self._streams)
        parts = len(self._streams) if by_rows else min(len(self._streams), max(1, n // 16))
        cuts = [(B * i // parts) * L if by_rows else n * i // parts for i in range(parts + 1)]
        spans = list(zip(self._streams, cuts, cuts[1:]))
        flat = ids.reshape(n)
        pos = mx.broadcast_to(self.pos[:L], (B, L, self.hidden)).reshape(n, self.hidden)
        xs = []
        for s, a, b in spans:
            with mx.stream(s):
                xs.append(self._ln(self.word[flat[a:b]] + pos[a:b] + self.type0, self.ln0))
        for lay in self.layers:
            qkv = []
            for (s, _, _), x in zip(spans, xs):
                with mx.stream(s):
                    qkv.append(mx.addmm(lay["qkv"][1], x, lay["qkv"][0]))
            mx.eval(qkv)
            if by_rows:
                ctx = attention_numpy([np.asarray(q).reshape((b - a) // L, L, -1) for q, (_, a, b) in zip(qkv, spans)],
                                      [lengths[a // L:b // L] for _, a, b in spans], H, scale)
            else:
                whole = np.concatenate([np.asarray(q) for q in qkv]).reshape(B, L, -1)
                (ctx,) = attention_numpy([whole], [lengths], H, scale)
                ctx = [ctx[a:b] for _, a, b in spans]
            for i, (s, _, _) in enumerate(spans):
                with mx.stream(s):
                    x = self._ln(xs[i] + mx.addmm(lay["out"][1], mx.array(ctx[i]), lay["out"][0]), lay["ln1"])
                    h = gelu(mx.addmm(lay["up"][1], x, lay["up"][0]))
                    xs[i] = self._ln(x + mx.addmm(lay["down"][1], h, lay["down"][0]), lay["ln2"])
        out = mx.concatenate(xs) if parts > 1 else xs[0]
        return out.reshape(B, L, self.hidden)
