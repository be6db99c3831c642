"""Read a GGUF file: its metadata and its tensors, dequantized exactly or repacked for MLX.

The `gguf` package (llama.cpp's own reader) dequantizes every block type, K-quants
included, exactly in float32. `mx.load` is not used: it rejects Q5_0 and dequantizes
Q4_K wrongly. Q8_0/Q4_0/Q4_1 blocks are 32 weights sharing one scale (and offset),
which MLX's affine quantization holds without loss, so those can stay packed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

GROUP_SIZE = 32
PACKABLE = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4}  # block type -> MLX bits


class GGUFFile:
    def __init__(self, path: Path):
        try:
            self._reader = GGUFReader(path)
            self.meta = {k: f.contents() for k, f in self._reader.fields.items() if not k.startswith("GGUF.")}
        except Exception as e:  # a truncated or foreign file fails somewhere inside the reader
            raise ValueError(f"not a readable GGUF file: {e}") from e
        self.tensors = {t.name: t for t in self._reader.tensors}

    def get(self, key, default=None):
        return self.meta.get(key, default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequantized(self, name: str) -> np.ndarray:
        """float32, in the (rows, cols) order of the HF/MLX weight."""
        t = self.tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))

    def packed(self, name: str):
        """(weight uint32, scales f16, biases f16, bits) in MLX's affine layout, or None."""
        t = self.tensors[name]
        if t.tensor_type not in PACKABLE:
            return None
        return (*_repack(np.asarray(t.data), t.tensor_type), PACKABLE[t.tensor_type])


def _repack(data: np.ndarray, qtype: Q):
    rows = data.shape[0]
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    blocks = data.reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if qtype == Q.Q8_0:
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # w = d*q = d*(q+128) - 128d
        return q.reshape(rows, -1).view(np.uint32), d, (d * np.float16(-128)).astype(np.float16)
    qs = blocks[..., 2:] if qtype == Q.Q4_0 else blocks[..., 4:]
    # GGUF: the low nibbles are weights 0..15 of the block, the high ones 16..31.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # MLX: weight j at bits 4*(j%8)
    weight = packed.reshape(rows, -1).view(np.uint32)
    if qtype == Q.Q4_0:
        return weight, d, (d * np.float16(-8)).astype(np.float16)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    return weight, d, m
