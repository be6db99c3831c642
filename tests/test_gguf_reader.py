"""The GGUF header reader against the `gguf` package's GGUFReader, and the lossless repack."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

import tiny_gguf
from daemon.models.gguf.reader import GGUFFile
from daemon.models.sources import _embedded_gguf


def _same_as_gguf_reader(path):
    ours, ref = GGUFFile(path), GGUFReader(path)
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.meta.keys() == expected.keys()
    for k, v in expected.items():
        assert ours.meta[k] == pytest.approx(v) if isinstance(v, float) else ours.meta[k] == v, k
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type and mine.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(np.asarray(mine.data), np.asarray(t.data)), t.name


def test_reads_what_gguf_reads(tmp_path):
    _same_as_gguf_reader(_embedded_gguf("embedded:smollm2"))
    for name in tiny_gguf.SPECS:
        tiny_gguf.write(tmp_path / f"{name}.gguf", name)
        _same_as_gguf_reader(tmp_path / f"{name}.gguf")


@pytest.mark.parametrize("qtype, bits", [(Q.Q8_0, 8), (Q.Q4_0, 4), (Q.Q4_1, 4)])
def test_repack_is_lossless(tmp_path, qtype, bits):
    rows = np.random.default_rng(1).standard_normal((64, 96)).astype(np.float32)
    w = GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("m.weight", quantize(rows, qtype), raw_dtype=qtype)
    w.add_tensor("k.weight", quantize(rows, Q.Q5_0), raw_dtype=Q.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "q.gguf")
    weight, scales, biases, got_bits = f.packed("m.weight")
    assert got_bits == bits and scales.dtype == np.float16 and scales.shape == (64, 3)
    out = mx.dequantize(mx.array(weight), mx.array(scales).astype(mx.float32), mx.array(biases).astype(mx.float32),
                        group_size=32, bits=bits)
    exact = dequantize(quantize(rows, qtype), qtype)
    assert np.array_equal(np.array(out), exact) and np.array_equal(f.dequantized("m.weight"), exact)
    assert f.packed("k.weight") is None  # Q5_0 has no lossless MLX layout


def test_truncated_file_is_a_value_error(tmp_path):
    src = _embedded_gguf("embedded:smollm2").read_bytes()
    for n in (3, 1000, len(src) // 2):
        (tmp_path / "t.gguf").write_bytes(src[:n])
        with pytest.raises(ValueError, match="not a readable GGUF"):
            GGUFFile(tmp_path / "t.gguf")
