"""The memory tier in blocks, in-process on the real model: entries sharing a prefix keep it
once, eviction frees only what nobody holds, an assembled hit is the cache it was stored as,
and a hybrid model's checkpoint costs its own state."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.worker.cache.prefix import PrefixCache
from tiny_models import tiny_model

BT = 64
SHARED = list(range(100, 100 + 5 * BT + 10))     # five full blocks and a bit


@pytest.fixture(scope="module")
def model():
    return load(str(resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE).path))[0]


def prefill(model, tokens):
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache, logits[0, -1]


def new_cache(model, tmp_path, budget=1 << 30, **kw):
    return PrefixCache(model, fingerprint="b" * 64, root=tmp_path, memory_budget=budget, disk_budget=0,
                       block_tokens=BT, **kw)


def per_token(cache) -> int:
    """KV bytes of one token (a cache's buffers are allocated in steps, past its offset)."""
    return sum(c.keys[..., :1, :].nbytes + c.values[..., :1, :].nbytes for c in cache)


def test_two_sessions_sharing_a_prefix_keep_it_once(model, tmp_path):
    pc = new_cache(model, tmp_path)
    a, b = SHARED + [7] * 40, SHARED + [9] * 90
    pc.store(a, prefill(model, a)[0])
    cb = prefill(model, b)[0]
    tok = per_token(cb)
    pc.store(b, cb)
    m = pc.stats()["memory"]
    # The five shared blocks once, then each entry's own tail.
    assert m["unique_blocks"] == 5 + 1      # b's 410 tokens hold a sixth full block of its own
    assert m["unique_bytes"] == (len(b) + len(a) - 5 * BT) * tok
    assert m["logical_bytes"] == (len(a) + len(b)) * tok
    assert m["sharing_ratio"] > 1.5


def test_evicting_one_keeps_the_others_blocks_and_it_still_hits(model, tmp_path):
    a, b = SHARED + [7] * 40, SHARED + [9] * 40
    ca, cb = prefill(model, a)[0], prefill(model, b)[0]
    tok = per_token(cb)
    pc = new_cache(model, tmp_path, budget=450 * tok)    # the shared 320 once and two tails of 50; not more
    pc.store(a, ca)
    pc.store(b, cb)
    assert len(pc.memory) == 2 and pc.memory_bytes == 420 * tok
    c = SHARED[:5 * BT] + [5] * 60                     # 60 more tokens of its own: the oldest, a, goes
    pc.store(c, prefill(model, c)[0])
    assert pc.counters["memory_evictions"] == 1 and pc.memory_bytes == 430 * tok <= pc.memory_budget
    assert [e.n_tokens for e in pc.memory.values()] == [len(b), len(c)]
    cache, n, tier = pc.fetch(b + [1])
    assert (n, tier) == (len(b), "memory")
    cold = prefill(model, b)[0]
    for got, want in zip(cache, cold):
        assert got.offset == want.offset
        assert mx.array_equal(got.keys[..., :n, :], want.keys[..., :n, :]).item()
        assert mx.array_equal(got.values[..., :n, :], want.values[..., :n, :]).item()


def test_a_block_assembled_hit_decodes_as_cold(model, tmp_path):
    pc = new_cache(model, tmp_path)
    stored = SHARED + [3] * 50
    pc.store(stored, prefill(model, stored)[0])
    prompt = SHARED[:3 * BT + 17] + [11, 12, 13]          # ends inside a block: a cut of the chain
    cache, n, _ = pc.fetch(prompt)
    assert n == 3 * BT + 17
    logits = model(mx.array([prompt[n:]]), cache=cache)[0, -1]
    _, cold = prefill(model, prompt)
    assert int(mx.argmax(logits)) == int(mx.argmax(cold))
    assert float(mx.max(mx.abs(logits - cold))) < 1e-3


def test_superseding_keeps_the_shared_blocks(model, tmp_path):
    pc = new_cache(model, tmp_path)
    t1 = SHARED[:2 * BT + 5]
    t2 = SHARED + [4] * 30
    pc.store(t1, prefill(model, t1)[0])
    pc.store(t2, prefill(model, t2)[0])
    assert len(pc.memory) == 1                       # turn 1 is covered by turn 2
    assert pc.stats()["memory"]["logical_bytes"] == pc.memory_bytes   # nothing kept twice
    cache, n, _ = pc.fetch(t1 + [1])
    assert n == len(t1) and cache[0].offset == len(t1)


def test_quantized_blocks_restore(model, tmp_path):
    pc = new_cache(model, tmp_path, kv_bits=8)
    a, b = SHARED + [7] * 40, SHARED + [9] * 40
    pc.store(a, prefill(model, a)[0])
    pc.store(b, prefill(model, b)[0])
    assert pc.stats()["memory"]["unique_blocks"] == 5
    cache, n, _ = pc.fetch(b[:300] + [2])
    assert n == 300 and type(cache[0]).__name__ == "KVCache"     # dequantized for the batch
    cold = prefill(model, b[:300])[0]
    assert float(mx.max(mx.abs(cache[0].keys[..., :300, :] - cold[0].keys[..., :300, :]))) < 0.1


def test_block_tokens_must_be_a_multiple_of_32(model, tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        PrefixCache(model, fingerprint="b" * 64, root=tmp_path, memory_budget=1, disk_budget=0, block_tokens=48)


@pytest.mark.parametrize("arch", ["qwen3_5", "gemma3_text", "gpt_oss", "nemotron_h", "lfm2", "llama"])
def test_a_checkpoint_costs_its_own_state(arch, tmp_path, record_property):
    """A checkpoint sharing its attention KV with the longer entry of its conversation costs its
    tail and its untrimmable layers only (issue 21 item 2)."""
    try:
        m = load(str(tiny_model(arch)))[0]
    except (KeyError, ValueError) as exc:       # an architecture this mlx-lm lacks
        pytest.skip(f"{arch}: {exc}")
    pc = new_cache(m, tmp_path)
    long = list(range(10, 10 + 8 * BT + 20))
    ckpt = long[:4 * BT]
    pc.store(long, prefill(m, long)[0])
    pc.store(ckpt, prefill(m, ckpt)[0])
    full = pc.entries[[k for k, v in pc.entries.items() if v.n_tokens == len(ckpt)][0]].nbytes
    e = pc.entries[[k for k, v in pc.entries.items() if v.n_tokens == len(ckpt)][0]]
    if e.trimmable:
        assert e.mem is None or len(pc.memory) == 1       # covered by the longer entry: superseded
        return
    own = e.mem.own_bytes
    record_property("checkpoint_bytes", f"{arch}: own {own} vs full {full} ({own / full:.2f})")
    print(f"{arch}: checkpoint {own} B vs full snapshot {full} B ({own / full:.2f})")
    has_attention = any(plain for plain in e.mem.layout.plain)
    assert own < full if has_attention else own == full
    cache, n, _ = pc.fetch(ckpt + [1, 2])
    assert n == len(ckpt)
    np.testing.assert_allclose(np.array(model_logits(m, cache, [1, 2])), np.array(prefill(m, ckpt + [1, 2])[1]),
                               atol=1e-3)


def model_logits(m, cache, rest):
    out = m(mx.array([rest]), cache=cache)[0, -1]
    mx.eval(out)
    return out
