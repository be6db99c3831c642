"""The prefix cache in-process, on the real model: trimming, untrimmable caches, the disk index."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import Future
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.worker.disk_cache import RECORD_GRACE
from daemon.worker.cache.index import BLOCK, _key, block_hashes
from daemon.worker.cache.prefix import PrefixCache


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
    return PrefixCache(model, fingerprint="f" * 64, root=tmp_path, memory_budget=kw.pop("memory_budget", 1 << 30),
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


def test_an_untrimmable_entry_known_only_from_disk_is_found_whole(model, tmp_path):
    """Its record names 2 full blocks of its 80 tokens; the key settles the other 16, so after a
    restart it is a hit at its full length (it used to be matched at 64, and an untrimmable
    entry is no use at 64)."""
    pc = new_cache(model, tmp_path)
    pc.store(TOKENS, prefill(model, TOKENS, [RotatingKVCache(max_size=64, keep=4) for _ in model.layers]))
    pc.close()
    again = new_cache(model, tmp_path)
    assert all(e.tokens is None and not e.trimmable for e in again.entries.values())
    assert again.fetch(TOKENS[:70] + [1, 2])[1] == 0         # diverges inside it: still never served
    cache, n, tier = again.fetch(TOKENS + [5, 6])
    assert (n, tier) == (len(TOKENS), "disk") and cache[0].offset == len(TOKENS)
    again.close()


def test_disk_entries_are_found_after_a_restart_and_loaded_on_demand(model, tmp_path):
    pc = new_cache(model, tmp_path)
    for i in range(40):
        toks = [i + 1] * 3 + TOKENS[: 30 + i]
        pc.store(toks, prefill(model, toks, make_prompt_cache(model)))
    pc.close()                                           # flushes the writer
    again = new_cache(model, tmp_path)
    assert again.stats()["disk"]["entries"] == 40 and again.stats()["memory"]["entries"] == 0
    assert all(e.mem is None and e.tokens is None for e in again.entries.values())   # index only
    probe = [6] * 3 + TOKENS[:35] + [9, 9]
    cache, n, tier = again.fetch(probe)
    assert (n, tier) == (38, "disk") and cache[0].offset == 38
    assert again.stats()["memory"]["entries"] == 1       # promoted
    again.close()


def test_a_lookup_hashes_the_prompt_once_however_many_disk_candidates(model, tmp_path, monkeypatch):
    """Defect 8: each disk-only candidate re-hashed the whole prompt on the engine thread."""
    import daemon.worker.cache.prefix as mod

    pc = new_cache(model, tmp_path)
    for i in range(5):
        toks = TOKENS + [i + 1] * 20
        pc.store(toks, prefill(model, toks, make_prompt_cache(model)))
    pc.close()
    again = new_cache(model, tmp_path)
    assert sum(e.tokens is None for e in again.entries.values()) == 5       # disk-only, all candidates
    calls = []
    monkeypatch.setattr(mod, "block_hashes", lambda *a, **kw: calls.append(a) or block_hashes(*a, **kw))
    cache, n, tier = again.fetch(TOKENS + [3] * 20 + [9])
    assert (n, tier) == (100, "disk") and len(calls) == 1
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
    first.disk.flush()                                   # (its files go on the writer thread)
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


def test_namespaces_never_match_in_memory_under_one_block_or_on_disk(model, tmp_path):
    pc = new_cache(model, tmp_path)
    short = TOKENS[:10]                                  # under one block: found by looking at memory
    for toks in (TOKENS, short):
        pc.store(toks, prefill(model, toks, make_prompt_cache(model)), ns="alice")
    assert pc.fetch(TOKENS + [1], ns="alice")[1] == len(TOKENS)
    assert pc.fetch(short + [1], ns="alice")[1] == len(short)
    for ns in ("", "bob"):
        assert pc.fetch(TOKENS + [1], ns=ns)[1] == 0
        assert pc.fetch(short + [1], ns=ns)[1] == 0
    # Bob's longer turn of the same tokens supersedes nothing of Alice's.
    longer = TOKENS + [5, 6, 7]
    pc.store(longer, prefill(model, longer, make_prompt_cache(model)), ns="bob")
    assert pc.fetch(TOKENS + [1], ns="alice")[1] == len(TOKENS)
    assert pc.fetch(longer + [1], ns="bob")[1] == len(longer)
    pc.close()
    again = new_cache(model, tmp_path)                   # the disk tier: indexed, read on demand
    assert again.fetch(TOKENS + [1], ns="")[1] == 0
    assert again.fetch(longer + [1], ns="alice")[1:] == (len(TOKENS), "disk")    # Alice's own, not Bob's longer one
    assert again.fetch(longer + [1], ns="bob")[1:] == (len(longer), "disk")
    again.close()


def test_sessions_sharing_a_prefix_refresh_the_one_used_last(model, tmp_path):
    """Two entries share a prompt's longest prefix: the hit is served from (and refreshes in the
    LRU) the one used most recently, whichever order a set of their keys comes in, so the
    session being continued is the one kept when memory runs short."""
    pc = new_cache(model, tmp_path, disk_budget=0)
    shared = TOKENS[:2 * BLOCK]
    a, b = shared + [5, 6, 7], shared + [8, 9, 10]
    key_a = pc.store(a, prefill(model, a, make_prompt_cache(model)))
    key_b = pc.store(b, prefill(model, b, make_prompt_cache(model)))
    assert pc.fetch(shared + [1, 2])[1] == len(shared) and pc.last_key == key_b
    pc.fetch(a + [3])                                   # a continued: now the one used last
    assert pc.fetch(shared + [4, 4])[1] == len(shared) and pc.last_key == key_a
    assert list(pc.memory) == [key_b, key_a]
    pc.close()


def test_a_miss_on_what_the_budget_evicted_says_evicted(model, tmp_path):
    """Memory holds one entry and there is no disk tier: storing a second evicts the first, and
    its prompt is then an `evicted` miss (the budget's doing), while a prompt never seen is `cold`."""
    probe = new_cache(model, tmp_path / "probe", disk_budget=0)
    probe.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    one = probe.memory_bytes
    probe.close()
    pc = new_cache(model, tmp_path, disk_budget=0, memory_budget=one * 3 // 2)
    other = list(range(300, 380))
    pc.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    pc.store(other, prefill(model, other, make_prompt_cache(model)))
    assert pc.counters["memory_evictions"] == 1
    assert pc.fetch(TOKENS + [1])[:2] == (None, 0)
    o = pc.last_outcome
    assert o.reason == "evicted" and "at least 64 tokens" in o.detail, o
    assert pc.fetch(other + [1])[1] == len(other)
    pc.fetch(list(range(500, 580)))
    assert pc.last_outcome.reason == "cold"
    pc.close()


def test_block_hashes_chain():
    a = block_hashes(list(range(3 * BLOCK + 5)))
    b = block_hashes(list(range(2 * BLOCK)) + [0] * BLOCK)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]


def test_an_entry_larger_than_the_memory_budget_is_served_from_disk(model, tmp_path):
    """It used to be evicted (and unindexed) by its own store, then crash the worker on promotion."""
    pc = new_cache(model, tmp_path, memory_budget=1000)
    turn1, turn2 = TOKENS, TOKENS + list(range(300, 340))
    pc.store(turn1, prefill(model, turn1, make_prompt_cache(model)))
    cache, n, tier = pc.fetch(turn1 + [5])
    assert (n, tier) == (len(turn1), "disk") and cache[0].offset == len(turn1)
    pc.store(turn2, prefill(model, turn2, make_prompt_cache(model)))     # supersedes turn 1
    pc.close()
    again = new_cache(model, tmp_path, memory_budget=1000)
    for probe, want in ((turn2 + [5], len(turn2)), (turn1 + [9], len(turn1))):   # whole, and trimmed
        cache, n, tier = again.fetch(probe)
        assert (n, tier) == (want, "disk") and all(c.offset == want for c in cache)
    s = again.stats()
    assert s["memory"]["bytes"] == 0 and s["disk"]["entries"] == 1 and s["too_large_for_memory"] == 2
    again.close()


def test_a_disk_hit_is_read_off_the_calling_thread(model, tmp_path):
    pc = new_cache(model, tmp_path)
    pc.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    pc.close()
    again = new_cache(model, tmp_path)
    fut = again.fetch_nowait(TOKENS + [1])
    assert isinstance(fut, Future) and again.stats()["queries"] == 0    # counted once, when served
    fut.result(timeout=60)
    cache, n, tier = again.fetch_nowait(TOKENS + [1])
    assert (n, tier) == (len(TOKENS), "disk") and cache[0].offset == len(TOKENS)
    assert again.fetch_nowait(TOKENS + [2])[2] == "memory"               # promoted
    s = again.stats()
    assert s["queries"] == 2 and s["disk"]["loads"] == 1 and not again.reads
    again.close()


def test_the_write_queue_is_bounded_in_bytes(model, tmp_path):
    """Past `write_buffer` queued bytes an entry is not written (counted); it is still served from
    memory, and the disk entries it would have superseded stay."""
    pc = new_cache(model, tmp_path)
    # A disk that does not answer: the writer blocks opening the first entry's record, a FIFO,
    # until this test reads it, so that entry stays queued whatever the disk's speed.
    stuck = [0] + TOKENS
    fifo = pc.disk.dir / f"{_key(np.asarray(stuck, np.int32))}.json.tmp.{os.getpid()}"
    os.mkfifo(fifo)
    stuck_cache = prefill(model, stuck, make_prompt_cache(model))
    pc.store(stuck, stuck_cache)
    convs = [[i] + TOKENS for i in (1, 2, 3)]
    caches = [prefill(model, t, make_prompt_cache(model)) for t in convs]
    nbytes = [sum(c.nbytes for c in cache) for cache in [stuck_cache, *caches]]
    pc.disk.write_buffer = nbytes[0] + nbytes[1]       # room for the first conversation only
    for t, c in zip(convs, caches):
        pc.store(t, c)
    s = pc.stats()["disk"]
    assert s["dropped_writes"] == 2 and s["queue_bytes"] == nbytes[0] + nbytes[1] and s["pending_writes"] == 2
    assert all(pc.fetch(t + [7])[2] == "memory" for t in convs)
    with open(fifo, "rb") as f:                        # the disk answers
        assert json.loads(f.read())["n_tokens"] == len(stuck)
    pc.disk.flush()
    s = pc.stats()["disk"]
    # The FIFO cannot be fsynced (EINVAL): that entry is a write error, and its files are gone.
    assert s["write_errors"] == 1 and not list(pc.disk.dir.glob(f"{fifo.name.split('.')[0]}*"))
    assert s["entries"] == 1 and s["queue_bytes"] == 0 and s["pending_writes"] == 0
    # A dropped write supersedes nothing: the durable first turn stays findable on disk.
    longer = convs[0] + [400, 401, 402]
    pc.disk.write_buffer = 1
    pc.disk.queued_bytes += 10 ** 12     # the queue is full (as if a slow disk lagged far behind)
    pc.store(longer, prefill(model, longer, make_prompt_cache(model)))
    pc.disk.queued_bytes -= 10 ** 12
    assert pc.stats()["disk"]["dropped_writes"] == 3 and pc.stats()["disk"]["entries"] == 1
    pc.close()


def test_an_entry_larger_than_the_disk_budget_is_not_written(model, tmp_path):
    """It used to evict every other entry to make room, and then itself. KV grows in steps of
    256 tokens, so the two entries are one step (80 tokens) and two steps (300) long."""
    short, long = TOKENS, TOKENS + list(range(1000, 1220))
    caches = [prefill(model, t, make_prompt_cache(model)) for t in (short, long)]
    one_step, two_steps = (sum(c.nbytes for c in cache) for cache in caches)
    assert two_steps > one_step * 1.5
    budget = (one_step + two_steps) // 2 + 65536            # the short entry's file fits, the long one does not
    pc = new_cache(model, tmp_path, disk_budget=budget)
    pc.store(short, caches[0])
    pc.disk.flush()
    pc.store(long, caches[1])            # extends the short one, which it would supersede if written
    pc.disk.flush()
    s = pc.stats()["disk"]
    assert (s["too_large"], s["entries"], s["evictions"], s["superseded"]) == (1, 1, 0, 0), s
    assert pc.fetch(long + [5])[1:] == (len(long), "memory")          # still served, from memory
    pc.close()
    again = new_cache(model, tmp_path, disk_budget=budget)
    assert again.fetch(short + [5])[1:] == (len(short), "disk")        # the short one stayed on disk
    again.close()


def test_cache_files_are_private(model, tmp_path):
    """Prompts are the user's: 0600 files in 0700 directories, also ones an older mlxd left 0755."""
    root = tmp_path / "prefix"
    root.mkdir()
    os.chmod(root, 0o755)                                   # as an older mlxd left it
    pc = new_cache(model, root)
    pc.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    pc.disk.flush()
    files = list(pc.disk.dir.iterdir())
    assert {p.suffix or p.name for p in files} == {".safetensors", ".json", ".lock"}, files
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files), [(p.name, oct(p.stat().st_mode)) for p in files]
    assert root.stat().st_mode & 0o777 == 0o700 and pc.disk.dir.stat().st_mode & 0o777 == 0o700
    pc.close()


def test_the_namespace_names_the_mlx_and_mlx_lm_versions(model, tmp_path):
    import mlx_lm
    pc = new_cache(model, tmp_path)
    assert f"mlx{mx.__version__}" in pc.disk.dir.name and f"lm{mlx_lm.__version__}" in pc.disk.dir.name
    pc.close()


def test_one_disk_budget_over_every_namespace(model, tmp_path):
    """`server.cache_disk_budget`: least recently used entries of any model go first."""
    a = new_cache(model, tmp_path)
    b = PrefixCache(model, fingerprint="e" * 64, root=tmp_path, memory_budget=1 << 30, disk_budget=1 << 30)
    toks = [[i] + TOKENS for i in range(4)]
    a.store(toks[0], prefill(model, toks[0], make_prompt_cache(model)))
    a.disk.flush()
    entry = sum(r["size"] for r in a.disk.records.values())
    a.disk.total_budget = b.disk.total_budget = int(2.5 * entry)
    b.store(toks[1], prefill(model, toks[1], make_prompt_cache(model)))
    b.disk.flush()
    a.fetch(toks[0] + [5])             # a's entry is used again: b's is now the oldest
    time.sleep(0.01)
    a.store(toks[2], prefill(model, toks[2], make_prompt_cache(model)))
    a.disk.flush()
    files = list(tmp_path.glob("*/*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= a.disk.total_budget
    assert {f.parent for f in files} == {a.disk.dir} and len(files) == 2   # b's went, though b was under its own budget
    key = next(iter(b.disk.records))
    assert b.disk.load(key) is None and b.stats()["disk"]["corrupt"] == 0   # gone, not corrupt
    a.close()
    b.close()


def test_orphan_sweep_spares_live_namespaces_and_honours_its_ttl(model, tmp_path):
    live = new_cache(model, tmp_path)               # a worker idle for long: its namespace looks old
    old = time.time() - 3600
    orphan = tmp_path / ("0" * 32)
    orphan.mkdir()
    (orphan / "x.safetensors").write_bytes(b"x")
    young = tmp_path / ("1" * 32)
    young.mkdir()
    for d in (live.disk.dir, orphan):
        os.utime(d, (old, old))
    other = PrefixCache(model, fingerprint="e" * 64, root=tmp_path, memory_budget=1 << 30,
                        disk_budget=1 << 30, orphan_ttl=600)
    assert not orphan.exists() and young.exists() and live.disk.dir.exists()
    assert other.disk.usable and live.disk.usable
    other.close()
    live.close()


def _sweep(root: str, n: int) -> bool:
    from daemon.worker.disk_cache import DiskTier
    tier = DiskTier(Path(root), f"ns-{os.getpid()}", 1 << 20, orphan_ttl=60)
    ok = tier.usable
    tier.close()
    return ok


def test_workers_sweeping_orphans_together_keep_their_disk_tier(tmp_path):
    """Two workers starting at once used to race (one's rmtree under the other's stat) and
    turn their disk tier off."""
    old = time.time() - 3600
    for round_ in range(10):
        for i in range(60):
            d = tmp_path / f"orphan-{round_}-{i}"
            d.mkdir()
            for j in range(5):
                (d / f"{j}.safetensors").write_bytes(b"x")
            os.utime(d, (old, old))
        with multiprocessing.get_context("fork").Pool(2) as pool:
            assert all(pool.starmap(_sweep, [(str(tmp_path), i) for i in range(2)])), f"round {round_}"


def test_a_revision_miss_names_the_newest_namespace_that_shares_the_prompt(model, tmp_path):
    """Two older revisions both hold the prompt's blocks: the miss names the newer of them, the
    one a person most likely just replaced."""
    import os

    dirs = []
    for fp, age in (("a" * 64, 7200), ("b" * 64, 3600)):
        pc = PrefixCache(model, fingerprint=fp, root=tmp_path, memory_budget=1 << 30, disk_budget=1 << 30,
                         model_name="m")
        pc.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
        pc.close()
        os.utime(pc.disk.dir, (time.time() - age, time.time() - age))
        dirs.append(pc.disk.dir.name)
    new = new_cache(model, tmp_path, model_name="m")
    new.fetch(TOKENS[:70] + [7])
    o = new.last_outcome
    assert o.reason == "revision" and dirs[1] in o.detail and dirs[0] not in o.detail, o
    new.close()


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    """The short soak once ended with a namespace's `.model.tmp.<pid>` left behind (a worker
    named its model while the disk was full); a write that fails removes its temp file."""
    from daemon.worker.disk_cache import MODEL_FILE, mark_model

    ns = tmp_path / "ns"
    (ns / MODEL_FILE / "in-the-way").mkdir(parents=True)      # the rename cannot replace a directory
    with pytest.raises(OSError):
        mark_model(ns, "m", None)
    assert sorted(p.name for p in ns.iterdir()) == [MODEL_FILE]


def test_close_is_bounded(model, tmp_path, caplog):
    pc = new_cache(model, tmp_path)
    for i in range(3):
        toks = [i] + TOKENS
        pc.store(toks, prefill(model, toks, make_prompt_cache(model)))
    with caplog.at_level("WARNING", logger="mlxd.prefix_cache"):
        pc.disk.close(timeout=0)
    assert "were not written" in caplog.text
    pc.disk.thread.join(60)


def test_a_miss_under_another_revision_of_the_model_says_so(model, tmp_path):
    """Weights, template or numerics changed: the old namespace's entries are never read, and
    a prompt they would have served is a `revision` miss naming that namespace, not `cold`."""
    old = new_cache(model, tmp_path, model_name="m")
    old.store(TOKENS, prefill(model, TOKENS, make_prompt_cache(model)))
    old.close()
    for name, reason in (("m", "revision"), ("other", "cold")):
        new = PrefixCache(model, fingerprint="e" * 64, root=tmp_path, memory_budget=1 << 30,
                          disk_budget=1 << 30, model_name=name)
        cache, n, _ = new.fetch(TOKENS[:70] + [7])
        o = new.last_outcome
        assert (cache, n, o.reason) == (None, 0, reason), o
        if reason == "revision":
            assert old.disk.dir.name in o.detail and "shares 64 tokens" in o.detail
            cache, n, _ = new.fetch([5] * 40)          # nothing of the old revision shares it
            assert new.last_outcome.reason == "cold"
        new.close()
