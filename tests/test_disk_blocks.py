"""The disk block store on its own: sharing, eviction, corruption, crashes, restarts, twins."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from daemon.worker.cache.blocks import Block
from daemon.worker.cache.disk import RECORD_GRACE, BlockStore, disk_or_prefill
from daemon.worker.cache.index import block_hashes

BT = 32                     # block tokens in these tests
LAYERS, HEADS, DIM = 2, 2, 64
NS = "ns-test"


def kv(seed: int, n: int = BT) -> tuple:
    rng = np.random.default_rng(seed)
    shape = (1, HEADS, n, DIM)
    return (mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16),
            mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16))


def blocks_of(tokens: list[int], kv_bits=None) -> list[Block]:
    """One block per BT tokens, KV derived from the block's hash (so shared prefixes share it)."""
    out = []
    for i, h in enumerate(block_hashes(tokens, ns=NS)):
        seed = int(h[:8], 16)
        layers = [kv(seed + j) for j in range(LAYERS)]
        if kv_bits:
            layers = [tuple(a for x in layer for a in mx.quantize(x, group_size=64, bits=kv_bits)) for layer in layers]
        mx.eval(layers)
        out.append(Block(h, i * BT, BT, layers))
    return out


def tail(n: int, seed: int = 7) -> list:
    c = KVCache()
    k, v = kv(seed, n)
    c.update_and_fetch(k, v)
    mx.eval(c.state)
    return [c]


def same(a: Block, b: Block) -> bool:
    return (a.hash, a.start, a.n_tokens) == (b.hash, b.start, b.n_tokens) and all(
        x.dtype == y.dtype and mx.array_equal(x, y).item() for la, lb in zip(a.layers, b.layers) for x, y in zip(la, lb))


def store(root: Path, budget=1 << 30, **kw) -> BlockStore:
    s = BlockStore(root, "model-ns", budget, orphan_ttl=86400, **kw)
    s.load_index()
    return s


SYSTEM = list(range(1000, 1000 + 4 * BT))          # a 4-block shared prefix


def put(s: BlockStore, key: str, tokens: list[int], tail_tokens: int = 5) -> list[Block]:
    bl = blocks_of(tokens)
    assert s.write(key, tokens + [1] * tail_tokens, bl, tail(tail_tokens), {"note": key})
    s.flush()
    return bl


def block_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.blk"))


def test_two_entries_sharing_a_prefix_store_it_once(tmp_path):
    s = store(tmp_path)
    a = put(s, "a", SYSTEM + list(range(2 * BT)))
    b = put(s, "b", SYSTEM + list(range(50, 50 + 2 * BT)))
    st = s.stats()
    assert st["entries"] == 2 and st["unique_blocks"] == 4 + 2 + 2 == len(block_files(tmp_path))
    assert st["blocks_written"] == 8 and st["blocks_deduped"] == 4
    block_bytes = sum(p.stat().st_size for p in block_files(tmp_path))
    assert st["unique_bytes"] - block_bytes == sum(p.stat().st_size for p in tmp_path.rglob("*.own"))
    assert st["logical_bytes"] > st["unique_bytes"] and st["sharing_ratio"] == st["logical_bytes"] / st["unique_bytes"]
    for key, bl in (("a", a), ("b", b)):
        hit = s.load(key)
        assert hit.complete and len(hit.blocks) == 6 and all(same(x, y) for x, y in zip(hit.blocks, bl))
        assert hit.own[0].offset == 5 and hit.n_tokens == 6 * BT + 5
    s.close()


def test_evicting_one_entry_keeps_the_others_blocks(tmp_path):
    s = store(tmp_path)
    put(s, "a", SYSTEM + list(range(2 * BT)))
    b = put(s, "b", SYSTEM + list(range(50, 50 + 2 * BT)))
    s.supersede(["a"])
    assert len(block_files(tmp_path)) == 6 and s.stats()["unique_blocks"] == 6
    hit = s.load("b")
    assert hit.complete and all(same(x, y) for x, y in zip(hit.blocks, b))
    assert s.load("a") is None
    s.close()


def test_a_corrupt_block_ends_the_hit_before_it(tmp_path):
    s = store(tmp_path)
    bl = put(s, "a", SYSTEM + list(range(2 * BT)))
    victim = s._block_path(bl[3].hash)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40                      # one bit, mid-payload
    victim.write_bytes(bytes(data))
    hit = s.load("a")
    assert not hit.complete and hit.own is None and len(hit.blocks) == 3 and hit.n_tokens == 3 * BT
    assert all(same(x, y) for x, y in zip(hit.blocks, bl))
    assert not victim.exists() and s.stats()["corrupt_blocks"] == 1
    s.close()


def test_a_missing_or_truncated_block_ends_the_hit(tmp_path):
    s = store(tmp_path)
    bl = put(s, "a", SYSTEM + list(range(2 * BT)))
    put(s, "b", SYSTEM + list(range(9, 9 + BT)))
    p = s._block_path(bl[1].hash)
    p.write_bytes(p.read_bytes()[:-100])               # truncated in place
    hit = s.load("a")
    assert len(hit.blocks) == 1 and same(hit.blocks[0], bl[0])
    s._block_path(bl[0].hash).unlink()                 # "b" now misses its first block
    assert s.load("b") is None and s.stats()["missing_blocks"] == 1
    s.close()


WRITER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from tests.test_disk_blocks import SYSTEM, BT, blocks_of, tail, store
from pathlib import Path
s = store(Path(sys.argv[1]))
for i in range(10_000):
    toks = SYSTEM + list(range(i * 7, i * 7 + 3 * BT))
    s.write(f"e{i}", toks + [1], blocks_of(toks), tail(1), {})
    s.flush()
    print(i, flush=True)
"""


def test_a_crash_mid_write_leaves_nothing_served_corrupt(tmp_path):
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), repo], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": repo + os.pathsep + os.path.join(repo, "tests")})
    for _ in range(3):
        proc.stdout.readline()                           # a few entries landed, more in flight
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # and, as a crash would leave them: a truncated temp file and a truncated final block
    bdir = tmp_path / "model-ns" / "blocks" / "ff"
    bdir.mkdir(exist_ok=True)
    (bdir / f"{'f' * 32}.blk.tmp.999999999").write_bytes(b"MLXDBLK1\x00")
    s = store(tmp_path)
    names = sorted(s.records)
    assert names, "no entry landed before the kill"
    first = s.load(names[0])
    p = s._block_path(first.blocks[-1].hash)
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 3])
    served = 0
    for key in names:
        hit = s.load(key)
        if hit is None:
            continue
        toks = [int(t) for t in hit.tokens[:len(hit.blocks) * BT]]
        for x, y in zip(hit.blocks, blocks_of(toks)):
            assert same(x, y), f"{key}: a block served wrong"
            served += 1
    assert served and s.stats()["corrupt_blocks"] >= 1
    s.close()
    s2 = BlockStore(tmp_path, "model-ns", 1 << 30, orphan_ttl=86400)   # sweeps dead writers' temp files
    s2.flush()
    assert not list(tmp_path.rglob("*.tmp.*"))
    s2.close()


def test_a_restart_finds_the_blocks(tmp_path):
    s = store(tmp_path)
    a = put(s, "a", SYSTEM + list(range(2 * BT)))
    s.close()
    s2 = store(tmp_path)
    assert s2.stats()["entries"] == 1 and s2.stats()["unique_blocks"] == 6
    hit = s2.load("a")
    assert hit.complete and all(same(x, y) for x, y in zip(hit.blocks, a))
    assert [int(t) for t in hit.tokens] == SYSTEM + list(range(2 * BT)) + [1] * 5
    s2.close()


def test_two_stores_on_one_directory(tmp_path):
    s1, s2 = store(tmp_path), store(tmp_path)
    put(s1, "a", SYSTEM + list(range(2 * BT)))
    b = put(s2, "b", SYSTEM + list(range(50, 50 + 2 * BT)))
    assert s2.stats()["blocks_deduped"] == 4           # s1 wrote the shared prefix
    s1.supersede(["a"])                                 # s1 does not know "b" yet: it must recount
    hit = s2.load("b")
    assert hit.complete and all(same(x, y) for x, y in zip(hit.blocks, b))
    assert len(block_files(tmp_path)) == 6
    s1.close()
    s2.close()


def test_startup_reads_manifests_not_blocks(tmp_path):
    s = store(tmp_path)
    for i in range(4):
        put(s, f"e{i}", SYSTEM + list(range(i * 100, i * 100 + 4 * BT)))
    s.close()
    files = block_files(tmp_path)
    total = sum(p.stat().st_size for p in files)
    for p in files:                                     # garbage of the same size: only a read can tell
        p.write_bytes(os.urandom(p.stat().st_size))

    def rchar() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    before = rchar()
    s2 = BlockStore(tmp_path, "model-ns", 1 << 30, orphan_ttl=86400, sweep=False)
    metas = s2.load_index()
    read = rchar() - before
    assert len(metas) == 4 and s2.stats()["unique_blocks"] == len(files)
    assert read < total / 4, f"start-up read {read} bytes of {total} in blocks"
    assert s2.load("e0") is None and s2.stats()["corrupt_blocks"] == 1
    s2.close()


def test_the_budget_counts_unique_bytes(tmp_path):
    s = store(tmp_path)
    put(s, "a", SYSTEM + list(range(2 * BT)))
    one = s.stats()["unique_bytes"]
    s.close()
    budget = int(one * 1.6)                            # two sharing entries fit; their logical sum does not
    s = store(tmp_path, budget=budget)
    put(s, "b", SYSTEM + list(range(50, 50 + 2 * BT)))
    st = s.stats()
    assert st["entries"] == 2 and st["evictions"] == 0 and st["logical_bytes"] > budget >= st["unique_bytes"]
    put(s, "c", list(range(5000, 5000 + 6 * BT)))     # shares nothing: the oldest goes
    assert s.stats()["evictions"] >= 1 and s.load("a") is None and s.load("c").complete
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.suffix in (".blk", ".own")) <= budget
    big = list(range(9000, 9000 + 40 * BT))
    assert not s.write("big", big, blocks_of(big), [], {}) and s.stats()["too_large"] == 1
    s.close()


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_bits_blocks_round_trip_quantized(tmp_path, bits):
    s = store(tmp_path)
    toks = SYSTEM + list(range(BT))
    bl = blocks_of(toks, kv_bits=bits)
    assert bl[0].layers[0][0].dtype == mx.uint32 and len(bl[0].layers[0]) == 6
    assert s.write("q", toks, bl, [], {})
    s.flush()
    s.close()
    hit = store(tmp_path).load("q")
    assert hit.complete and all(same(x, y) for x, y in zip(hit.blocks, bl)) and hit.own == []


def test_files_are_private(tmp_path):
    s = store(tmp_path)
    put(s, "a", SYSTEM)
    for p in (tmp_path / "model-ns").rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p}: {oct(mode)}"
    s.close()


def test_orphan_blocks_of_a_cut_write_age_out(tmp_path):
    s = store(tmp_path)
    put(s, "a", SYSTEM)
    s.close()
    orphan = blocks_of(list(range(7000, 7000 + BT)))[0]
    s = store(tmp_path)
    path = s._block_path(orphan.hash)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    from daemon.worker.cache.disk import encode_block
    path.write_bytes(encode_block(orphan))
    os.utime(path, (time.time() - RECORD_GRACE - 1,) * 2)
    s.close()
    s = store(tmp_path)
    s.flush()
    assert not path.exists() and len(block_files(tmp_path)) == 4 and s.load("a").complete
    s.close()


def test_reads_measure_disk_throughput(tmp_path):
    s = store(tmp_path)
    put(s, "a", SYSTEM)
    s.close()
    s = store(tmp_path)
    assert s.read_bps is None
    s.load("a")
    assert s.read_bps > 0 and s.stats()["read_bps"] == s.read_bps
    s.close()


def test_disk_or_prefill():
    assert disk_or_prefill(1000, 10 << 20, 1e9, 1000) == "disk"         # 10 ms vs 1 s
    assert disk_or_prefill(1000, 10 << 30, 100e6, 10_000) == "prefill"  # 107 s vs 0.1 s
    assert disk_or_prefill(1000, 1000, 1000, 1000) == "disk"           # a tie reads
    assert disk_or_prefill(1000, 10 << 30, None, 10_000) == "disk"     # nothing measured yet
    assert disk_or_prefill(1000, 10 << 30, 1e6, 0) == "disk"
