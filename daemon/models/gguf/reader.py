"""Read a GGUF file: its metadata and its tensors, dequantized exactly or repacked for MLX.

The header is parsed here with `struct` (the `gguf` package's GGUFReader takes ~25 s
on a 262K-token vocabulary: it builds a numpy view per array element); tensor data is
memory-mapped and dequantized by the `gguf` package (llama.cpp's own code), which is
exact for every block type, K-quants included. `mx.load` is not used: it rejects Q5_0
and dequantizes Q4_K wrongly. Q8_0/Q4_0/Q4_1 blocks are 32 weights sharing one scale
(and offset), which MLX's affine quantization holds without loss, so those can stay packed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

GROUP_SIZE = 32
PACKABLE = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4}  # block type -> MLX bits

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_PLAIN = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8,
          Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}


@dataclass
class Tensor:
    name: str
    type: Q
    shape: tuple  # numpy order (rows last-but-one), as HF/MLX want it
    data: np.ndarray  # memory-mapped; uint8 blocks for quantized types, as gguf.quants expects


class GGUFFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._parse()
        except (struct.error, ValueError, KeyError, UnicodeDecodeError, IndexError) as e:
            raise ValueError(f"not a readable GGUF file: {e}") from e

    def _parse(self):
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(raw)
        pos = 0

        def read(fmt):
            nonlocal pos
            vals = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return vals[0] if len(vals) == 1 else vals

        def string():
            nonlocal pos
            n = read("Q")
            s = bytes(buf[pos:pos + n]).decode("utf-8")
            pos += n
            return s

        def value(vtype):
            nonlocal pos
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                item, n = read("IQ")
                if item in _SCALARS and item != 7:
                    dt = np.dtype("<" + _SCALARS[item])
                    arr = np.frombuffer(buf, dtype=dt, count=n, offset=pos)
                    pos += n * dt.itemsize
                    return arr.tolist()
                return [value(item) for _ in range(n)]
            return read(_SCALARS[vtype])

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic")
        pos = 4
        version, n_tensors, n_kv = read("IQQ")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        self.meta = {}
        for _ in range(n_kv):
            key = string()
            self.meta[key] = value(read("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = read("I")
            dims = [read("Q") for _ in range(n_dims)]
            infos.append((name, dims, Q(read("I")), read("Q")))
        align = self.meta.get("general.alignment", 32)
        start = (pos + align - 1) // align * align
        self.tensors = {}
        for name, dims, qtype, offset in infos:
            shape = tuple(reversed(dims))
            n = int(np.prod(dims))
            block, size = GGML_QUANT_SIZES[qtype]
            if qtype in _PLAIN:
                dt, count, view = _PLAIN[qtype], n, shape
            else:
                dt, count, view = np.uint8, n // block * size, (*shape[:-1], shape[-1] // block * size)
            end = start + offset + count * np.dtype(dt).itemsize
            if end > len(raw):
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            data = np.frombuffer(buf, dtype=dt, count=count, offset=start + offset).reshape(view)
            self.tensors[name] = Tensor(name, qtype, shape, data)

    def get(self, key, default=None):
        return self.meta.get(key, default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].type.name

    def dequantized(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.asarray(dequantize(t.data, t.type), dtype=np.float32).reshape(t.shape)

    def packed(self, name: str):
        """(weight uint32, scales f16, biases f16, bits) in MLX's affine layout, or None."""
        t = self.tensors[name]
        if t.type not in PACKABLE or len(t.shape) != 2:
            return None
        return (*_repack(t.data, t.type), PACKABLE[t.type])


def _repack(data: np.ndarray, qtype: Q):
    rows = data.shape[0]
    size = GGML_QUANT_SIZES[qtype][1]
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
