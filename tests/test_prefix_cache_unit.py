"""The prefix cache in-process, on the real model: trimming, untrimmable caches, the disk index."""

from __future__ import annotations

import os
import time

import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.worker.disk_cache import RECORD_GRACE
from daemon.worker.prefix_cache import BLOCK, PrefixCache, block_hashes


@pytest.fixture(scope="module")
def model():
    from mlx_lm import load

    resolved = resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE)
    return load(str(resolved.path))[0]


def prefill(model, tokens, cache):
    model(mx.array([tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def new_cache(model, tmp_path, **kw):
    return PrefixCache(model, fingerprint="f" * 64, root=tmp_path, memory_budget=1 << 30,
                       disk_budget=kw.pop("disk_budget", 1 << 30), **kw)


TOKENS = list(range(100, 180))      # 80 tokens: two full blocks and a partial one


def test_prefix_of_a_longer_entry_is_trimmed(model, tmp_path):
    pc = new_cache(model, tmp_path)
    pc.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    cache, n, tier = pc.fetch(TOKENS[:50] + [7, 8, 9])
    assert (n, tier) == (50, "memory")
    assert all(c.offset == 50 for c in cache)
    # The stored entry itself is untouched by the trim of the copy handed out.
    cache, n, _ = pc.fetch(TOKENS + [1])
    assert n == len(TOKENS) and cache[0].offset == len(TOKENS)
    pc.close()


def test_exact_repeat_leaves_one_token_to_compute(model, tmp_path):
    pc = new_cache(model, tmp_path)
    pc.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    _, n, _ = pc.fetch(TOKENS)
    assert n == len(TOKENS) - 1
    pc.close()


def test_untrimmable_cache_is_reused_only_whole(model, tmp_path):
    pc = new_cache(model, tmp_path, disk_budget=0)
    rotating = prefill(model, TOKENS, [RotatingKVCache(max_size=64, keep=4) for _ in model.layers])
    assert isinstance(rotating[0], RotatingKVCache) and not rotating[0].is_trimmable()
    pc.store(TOKENS, rotating)
    assert pc.fetch(TOKENS[:50] + [1, 2])[1] == 0        # would need a trim: never served
    assert pc.fetch(TOKENS)[1] == 0                      # would need a trim by one: never served
    assert pc.fetch(TOKENS + [5, 6])[1] == len(TOKENS)   # a strict prefix: reused whole
    pc.close()


def test_disk_entries_are_found_after_a_restart_and_loaded_on_demand(model, tmp_path):
    pc = new_cache(model, tmp_path)
    for i in range(40):
        toks = [i + 1] * 3 + TOKENS[: 30 + i]
        pc.store(toks, prefill(model, toks, make_prompt_cache(model)))
    pc.close()                                           # flushes the writer
    again = new_cache(model, tmp_path)
    assert again.stats()["disk"]["entries"] == 40 and again.stats()["memory"]["entries"] == 0
    assert all(e.cache is None and e.tokens is None for e in again.entries.values())   # index only
    probe = [6] * 3 + TOKENS[:35] + [9, 9]
    cache, n, tier = again.fetch(probe)
    assert (n, tier) == (38, "disk") and cache[0].offset == 38
    assert again.stats()["memory"]["entries"] == 1       # promoted
    again.close()


def test_two_workers_sharing_a_namespace_do_not_spoil_each_other(model, tmp_path):
    """Same weights, two workers (two models, or a replacement starting beside the old one):
    a starting worker keeps the other's writes in flight, and an entry the other evicted is
    gone, not corrupt. Leftovers of dead writers and overdue records still go."""
    first = new_cache(model, tmp_path)
    first.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    first.disk.flush()
    ns = first.disk.dir
    live_tmp = ns / f"a{'0' * 31}.tmp.{os.getpid()}.safetensors"          # a write in progress
    fresh = ns / f"b{'0' * 31}.safetensors"                               # renamed, record not yet
    dead_tmp = ns / f"c{'0' * 31}.tmp.999999999.safetensors"              # its writer is gone
    overdue = ns / f"d{'0' * 31}.safetensors"
    for p in (live_tmp, fresh, dead_tmp, overdue):
        p.write_bytes(b"x")
    old = time.time() - 2 * RECORD_GRACE
    os.utime(overdue, (old, old))

    second = new_cache(model, tmp_path)
    assert live_tmp.exists() and fresh.exists()
    assert not dead_tmp.exists() and not overdue.exists()
    assert second.stats()["disk"]["entries"] == 1

    entry = sum(r["size"] for r in first.disk.records.values())
    first.clear()                                        # deletes the entry second indexed at start
    cache, n, _ = second.fetch(TOKENS + [7])
    assert (cache, n) == (None, 0)
    assert second.stats()["disk"]["corrupt"] == 0 and second.stats()["disk"]["entries"] == 0

    for p in (live_tmp, fresh):
        p.unlink()
    # one budget for the namespace: what both write stays under it, whoever wrote it
    budget = first.disk.budget = second.disk.budget = int(2.5 * entry)     # room for two entries
    for i in range(3):
        for j, pc in enumerate((first, second)):
            toks = [i + 1, j + 50] + TOKENS
            pc.store(toks, prefill(model, toks, make_prompt_cache(model)))
            pc.disk.flush()
            assert sum(p.stat().st_size for p in ns.glob("*.safetensors")) <= budget
    assert len(list(ns.glob("*.safetensors"))) == 2
    first.close()
    second.close()


def test_block_hashes_chain():
    a = block_hashes(list(range(3 * BLOCK + 5)))
    b = block_hashes(list(range(2 * BLOCK)) + [0] * BLOCK)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
