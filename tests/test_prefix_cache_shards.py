"""The prefix cache of a pipeline rank, in-process on the real model: each rank's shard of an entry
(its layers of the KV), under one key, in one shared directory; a shard under another rank's
name never served; followers serving by key and dropping only what rank 0 drops."""

from __future__ import annotations

import json
import shutil
import zlib

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.models.pipeline import Stage
from daemon.worker.cache.prefix import PrefixCache

R0, R1 = Stage(0, 2, 15, 30), Stage(1, 2, 0, 15)     # SmolLM2's 30 layers, rank 1 first
TOKENS = list(range(100, 180))


@pytest.fixture(scope="module")
def model():
    from mlx_lm import load

    return load(str(resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE).path))[0]


def shards(model, tokens) -> dict:
    """Each rank's part of the single process's KV of `tokens`."""
    cache = make_prompt_cache(model)
    model(mx.array([tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return {R1: cache[:15], R0: cache[15:]}


def rank(tmp_path, stage, **kw):
    return PrefixCache(None, fingerprint="f" * 64, root=tmp_path, memory_budget=kw.pop("memory_budget", 1 << 30),
                       disk_budget=kw.pop("disk_budget", 1 << 30), stage=stage, **kw)


def written(model, tmp_path) -> str:
    """Both ranks store their shard of TOKENS in one directory, and stop; the key."""
    parts = shards(model, TOKENS)
    r0, r1 = rank(tmp_path, R0), rank(tmp_path, R1, follower=True)
    key = r0.store(TOKENS, parts[R0])
    assert r1.store(TOKENS, parts[R1]) == key             # the same key on every rank
    r0.close()
    r1.close()
    return key


def test_ranks_sharing_a_directory_each_get_their_own_shard_back(model, tmp_path):
    key = written(model, tmp_path)
    parts = shards(model, TOKENS)
    r0, r1 = rank(tmp_path, R0), rank(tmp_path, R1, follower=True)
    assert r0.disk.dir != r1.disk.dir and r1.disk.dir.name.endswith("-r1of2-L0-14")
    for pc, stage in ((r0, R0), (r1, R1)):
        assert pc.has_key(key) and not pc.has_key("0" * 32)
        assert pc.entries[key].stage == stage.tag and pc.disk.records[key]["stage"] == stage.tag
        cache = pc.fetch_key(key, 50)                      # from disk, trimmed to rank 0's hit
        assert len(cache) == 15 and all(c.offset == 50 for c in cache)
        for mine, ref in zip(cache, parts[stage]):
            assert np.array_equal(np.array(mine.keys_and_values()[0]), np.array(ref.keys[..., :50, :]))
        assert pc.fetch_key(key, len(TOKENS) + 1) is None  # longer than the entry
        pc.close()


def test_a_shard_under_another_ranks_name_is_discarded_never_served(model, tmp_path):
    key = written(model, tmp_path / "a")
    probe = rank(tmp_path / "a", R0)
    ns0, ns1 = probe.disk.dir, probe.disk.dir.with_name(probe.disk.dir.name.replace(R0.tag, R1.tag))
    probe.close()
    # Rank 0's entry, file and record, copied over rank 1's.
    for suffix in (".safetensors", ".json"):
        shutil.copy(ns0 / f"{key}{suffix}", ns1 / f"{key}{suffix}")
    r1 = rank(tmp_path / "a", R1, follower=True)
    assert not r1.has_key(key) and r1.fetch_key(key, 50) is None
    assert r1.stats()["disk"]["corrupt"] == 1 and not (ns1 / f"{key}.safetensors").exists()
    r1.close()

    # Only the file swapped, its record made to fit it (size, CRC): the file's own stage gives it away.
    key = written(model, tmp_path / "b")
    ns0, ns1 = (tmp_path / "b" / d.name for d in (ns0, ns1))
    shutil.copy(ns0 / f"{key}.safetensors", ns1 / f"{key}.safetensors")
    data = (ns1 / f"{key}.safetensors").read_bytes()
    record = json.loads((ns1 / f"{key}.json").read_text())
    (ns1 / f"{key}.json").write_text(json.dumps({**record, "size": len(data), "crc32": zlib.crc32(data)}))
    r1 = rank(tmp_path / "b", R1, follower=True)
    assert r1.has_key(key)                                 # its record looks right...
    assert r1.fetch_key(key, 50) is None                   # ...its file does not
    assert r1.stats()["disk"]["corrupt"] == 1 and not r1.has_key(key)
    r1.close()


def test_a_follower_keeps_its_own_memory_budget_and_drops_what_rank_0_does(model, tmp_path):
    """Memory tier only: rank 0 evicts by LRU and drops the earlier turn a longer one covers;
    the follower never covers on its own, evicts its oldest past its own memory budget
    (defect 2: it used to keep every memory-only entry), and discards what rank 0's
    evicted_keys() lists."""
    turn1, turn2 = TOKENS[:40], TOKENS[:40] + [7] * 30
    others = [[i] * 3 + TOKENS[:40] for i in (1, 2)]
    p = {tuple(t): shards(model, t) for t in (turn1, turn2, *others)}
    size = max(sum(c.nbytes for c in s[R0]) for s in p.values())
    lead = rank(tmp_path, R0, disk_budget=0, memory_budget=int(2.5 * size))
    follower = rank(tmp_path, R1, disk_budget=0, memory_budget=int(2.5 * size), follower=True)
    keys = {}
    for t in (turn1, turn2, *others):
        keys[tuple(t)] = lead.store(t, p[tuple(t)][R0])
        assert follower.store(t, p[tuple(t)][R1]) == keys[tuple(t)]
    k1, k2, ka, kb = keys.values()
    # Rank 0: turn 1 covered by turn 2, then turn 2 pushed out by the other two (budget 2.5).
    assert lead.evicted_keys() == [k1, k2]
    assert lead.evicted_keys() == []                       # drained
    assert [lead.has_key(k) for k in (k1, k2, ka, kb)] == [False, False, True, True]
    assert follower.memory_bytes <= follower.memory_budget and follower.counters["memory_evictions"] >= 1
    assert not follower.has_key(k1) and follower.has_key(ka) and follower.has_key(kb)   # the oldest went
    for k in (k1, k2):
        follower.discard(k)
    assert [follower.has_key(k) for k in (k1, k2, ka, kb)] == [False, False, True, True]
    lead.close()
    follower.close()


def test_rank_0_reports_what_its_disk_budget_evicted(model, tmp_path):
    a, b = [1] * 3 + TOKENS, [2] * 3 + TOKENS
    pa, pb = shards(model, a), shards(model, b)
    probe = rank(tmp_path / "probe", R0, memory_budget=1)
    probe.store(a, pa[R0])
    probe.disk.flush()
    size = next(iter(probe.disk.records.values()))["size"]
    probe.close()
    # On disk only (memory budget 1 byte), room on disk for one entry and a half.
    lead = rank(tmp_path, R0, memory_budget=1, disk_budget=int(1.5 * size))
    follower = rank(tmp_path, R1, memory_budget=1, disk_budget=int(1.5 * size), follower=True)
    ka = lead.store(a, pa[R0])
    follower.store(a, pa[R1])
    lead.disk.flush()
    kb = lead.store(b, pb[R0])
    follower.store(b, pb[R1])
    lead.disk.flush()
    follower.disk.flush()
    assert lead.evicted_keys() == [ka] and not lead.has_key(ka) and lead.has_key(kb)
    assert follower.stats()["disk"]["evictions"] == 0      # over its budget, until rank 0 says
    assert follower.fetch_key(ka, len(a)) is not None and follower.has_key(kb)
    follower.discard(ka)
    follower.disk.flush()
    assert not follower.has_key(ka) and follower.stats()["disk"]["entries"] == 1
    lead.close()
    follower.close()


def test_a_rank_that_cannot_trim_says_so_for_the_length_asked(model, tmp_path):
    """Rank 0's layers may keep plain KV while another rank's keep a rotating window past its
    size: that rank holds the entry but can serve it only whole."""
    full = [RotatingKVCache(max_size=64, keep=4) if i < 15 else KVCache() for i in range(len(model.layers))]
    model(mx.array([TOKENS]), cache=full)
    mx.eval([c.state for c in full])
    follower = rank(tmp_path, R1, follower=True, disk_budget=0)
    key = follower.store(TOKENS, full[:15])
    assert follower.has_key(key) and follower.has_key(key, len(TOKENS))
    assert not follower.has_key(key, 50) and follower.fetch_key(key, 50) is None
    assert follower.fetch_key(key, len(TOKENS))[0].offset == len(TOKENS)
    follower.close()
