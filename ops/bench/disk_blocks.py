"""Disk block layout: one file per block (fan-out dirs) against packed segment files.

Measures, in a temp dir on this disk, for N small blocks each way: write throughput
(atomic: tmp + rename per file, fsync on a sample of `--fsync` writes since fsync per block
dominates and is the same per write either way), open+read cost per block after dropping
the process's own handles (page cache stays warm: "cold-ish"), start-up cost (what
start-up must read: a directory listing for files, every segment's index for segments),
and eviction cost (unlink vs. punching a segment, which needs compaction to free space).

    python ops/bench/disk_blocks.py [--n 100000] [--size 4096] [--fsync 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import zlib
from pathlib import Path


def files_way(root: Path, blocks: list[tuple[str, bytes]], n_fsync: int) -> dict:
    t0 = time.perf_counter()
    for i, (h, data) in enumerate(blocks):
        d = root / h[:2]
        if not d.is_dir():
            d.mkdir(exist_ok=True)
        tmp = d / f"{h}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            if i < n_fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, d / h)
    write_s = time.perf_counter() - t0
    sample = random.sample(blocks, min(2000, len(blocks)))
    t0 = time.perf_counter()
    for h, data in sample:
        with open(root / h[:2] / h, "rb") as f:
            assert zlib.crc32(f.read()) == zlib.crc32(data)
    read_s = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    n = sum(len(os.listdir(root / d)) for d in os.listdir(root))
    list_s = time.perf_counter() - t0
    assert n == len(blocks)
    t0 = time.perf_counter()
    for h, _ in sample[:1000]:
        os.unlink(root / h[:2] / h)
    evict_s = (time.perf_counter() - t0) / min(1000, len(sample))
    return {"write_MBps": len(blocks) * len(blocks[0][1]) / write_s / 1e6, "write_s": write_s,
            "read_ms_per_block": read_s * 1e3, "startup_listing_s": list_s,
            "evict_ms_per_block": evict_s * 1e3, "startup_reads": 0}


def segments_way(root: Path, blocks: list[tuple[str, bytes]], n_fsync: int, per_segment: int = 1024) -> dict:
    t0 = time.perf_counter()
    index: dict[str, tuple[int, int, int]] = {}
    for s in range(0, len(blocks), per_segment):
        seg = blocks[s:s + per_segment]
        tmp, path = root / f"{s}.seg.tmp", root / f"{s}.seg"
        idx, off = {}, 0
        with open(tmp, "wb") as f:
            for h, data in seg:
                f.write(data)
                idx[h] = (off, len(data))
                off += len(data)
            if s < n_fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        (root / f"{s}.idx").write_text(json.dumps(idx))
        for h, (o, n) in idx.items():
            index[h] = (s, o, n)
    write_s = time.perf_counter() - t0
    sample = random.sample(blocks, min(2000, len(blocks)))
    t0 = time.perf_counter()
    for h, data in sample:
        s, o, n = index[h]
        with open(root / f"{s}.seg", "rb") as f:
            f.seek(o)
            assert zlib.crc32(f.read(n)) == zlib.crc32(data)
    read_s = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    rebuilt = {}
    for p in root.glob("*.idx"):
        rebuilt.update(json.loads(p.read_text()))
    list_s = time.perf_counter() - t0
    assert len(rebuilt) == len(blocks)
    # eviction: a segment frees space only once compacted; cost = rewrite a segment holding
    # its live blocks, amortised over the blocks freed (half the segment evicted)
    t0 = time.perf_counter()
    seg0 = blocks[:per_segment]
    live = seg0[::2]
    with open(root / "0.seg.tmp", "wb") as f:
        for h, _ in live:
            s, o, n = index[h]
            with open(root / f"{s}.seg", "rb") as g:
                g.seek(o)
                f.write(g.read(n))
        f.flush()
        os.fsync(f.fileno())
    os.replace(root / "0.seg.tmp", root / "0.seg")
    evict_s = (time.perf_counter() - t0) / (len(seg0) - len(live))
    return {"write_MBps": len(blocks) * len(blocks[0][1]) / write_s / 1e6, "write_s": write_s,
            "read_ms_per_block": read_s * 1e3, "startup_listing_s": list_s,
            "evict_ms_per_block": evict_s * 1e3, "startup_reads": len(list(root.glob("*.idx")))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--fsync", type=int, default=2000, help="fsync the first N writes")
    ap.add_argument("--dir", default=None, help="parent of the temp dir (default: this repo's disk)")
    args = ap.parse_args()
    payload = os.urandom(args.size)
    blocks = [(f"{random.getrandbits(128):032x}", payload[:args.size - 8] + i.to_bytes(8, "little"))
              for i in range(args.n)]
    out = {"n": args.n, "block_bytes": args.size, "fsynced_writes": args.fsync}
    parent = args.dir or str(Path(__file__).resolve().parents[2])
    for name, way in (("files", files_way), ("segments", segments_way)):
        with tempfile.TemporaryDirectory(dir=parent, prefix=".bench-disk-") as d:
            out[name] = way(Path(d), blocks, args.fsync)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
