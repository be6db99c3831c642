"""The disk tier of the paged prefix cache: one file per block, one manifest per entry.

Layout under `root/<namespace>/` (the namespace names weights and numerics, as today):
  blocks/<h[:2]>/<hash>.blk    one Block: header (hash, start, n_tokens, array dtypes and
                               shapes) + raw arrays + CRC-32 of all before it
  entries/<key>.json           manifest: chain [[hash, file size], ...], tokens, meta, and
                               the CRC and size of the entry's own part
  entries/<key>.own            the entry's own part: its per-layer caches with trimmable
                               layers holding only the partial tail and untrimmable layers
                               their whole state (mlx-lm `save_prompt_cache`), if any
Why this shape:
- One file per block, not packed segments, measured by `ops/bench/disk_blocks.py` (100K
  4 KiB blocks, this machine's disk, page cache warm): open+read 0.072 ms/block for files vs
  0.040 for segments, a difference that vanishes against real blocks (a 256-token block of
  SmolLM2-135M is ~6 MB); eviction is an unlink (0.08 ms) that frees space at once, where a
  segment frees nothing until compacted (rewriting its live blocks); a block is written
  once, atomically, and deduplicated by a plain existence check. Writes were 20 MB/s vs 286
  for segments at 4 KiB, but that is one fsync per file against one per 1024 blocks: at
  MB-sized blocks the per-file cost is amortised. Listing 100K files takes 0.17 s, and
  start-up does not list them at all.
- Start-up reads the manifests only; reference counts (block -> manifests naming it) and
  unique bytes are rebuilt from them. Blocks are validated when read.
- A read walks the chain in order; the first missing, truncated or corrupt block ends the
  hit: the blocks before it are returned (`complete=False`, no own part), the bad file is
  removed and counted, and the entry's manifest is dropped (it no longer describes a whole
  entry). Nothing that fails its checksum is ever returned.
- Writes go behind the request on one writer thread, each file tmp + fsync + rename and the
  directory fsynced; the manifest is written last, so a kill at any moment leaves at worst
  unreferenced blocks (swept after RECORD_GRACE, off start-up) and temp files (ignored by
  readers, removed once their writer is dead).
- Several daemons on one directory: each holds a shared flock on the namespace for life
  (the orphan-TTL sweep of other namespaces needs it exclusive, as today), and a writer
  holds `.gc` shared from its existence checks to its manifest, while eviction and the
  orphan-block sweep hold it exclusive and recount references from every manifest on disk,
  so no daemon frees a block another daemon's new entry relies on.
- The budget counts unique bytes (each block once, plus own parts); eviction is entry LRU
  (manifest mtime, touched on use) and frees blocks no remaining manifest names. Entries
  larger than a budget are not written (`too_large`); files 0600, directories 0700.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import io
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from ..disk_cache import (_alive, _fsync_dir, _private_dir, _stale_tmp, _write_atomic, age_out_orphans,
                          claim_namespace, listdir)
from .blocks import Block

log = logging.getLogger("mlxd.prefix_cache")

MAGIC = b"MLXDBLK1"
RECORD_GRACE = 300.0     # an unreferenced block this old was left by a cut write
CLOSE_TIMEOUT = 20.0
BPS_ALPHA = 0.2          # weight of the newest read in the disk-throughput moving average


def disk_or_prefill(n_tokens: int, nbytes: int, disk_bps: Optional[float], prefill_tps: Optional[float]) -> str:
    """'disk' when reading `nbytes` at `disk_bps` is no slower than prefilling `n_tokens` at
    `prefill_tps` (both measured on this machine), else 'prefill'. Without a measurement of
    either, 'disk': reading is what the cache is for, and the first read measures it."""
    if not disk_bps or not prefill_tps or disk_bps <= 0 or prefill_tps <= 0:
        return "disk"
    return "disk" if nbytes / disk_bps <= n_tokens / prefill_tps else "prefill"


# -- block files -------------------------------------------------------------------------

def _dtype_name(a) -> str:
    return str(a.dtype).removeprefix("mlx.core.") if isinstance(a, mx.array) else np.dtype(a.dtype).name


def _raw(a) -> bytes:
    if isinstance(a, mx.array):
        a = mx.contiguous(a)
        mx.eval(a)
        return bytes(memoryview(a))
    return np.ascontiguousarray(a).tobytes()


def _array(buf: memoryview, dtype: str, shape: list[int]) -> mx.array:
    if dtype == "bfloat16":
        return mx.array(np.frombuffer(buf, dtype=np.uint16).reshape(shape)).view(mx.bfloat16)
    return mx.array(np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape))


def encode_block(b: Block) -> bytes:
    parts, layers = [], []
    for layer in b.layers:
        specs = []
        for a in layer:
            raw = _raw(a)
            specs.append([_dtype_name(a), list(a.shape), len(raw)])
            parts.append(raw)
        layers.append(specs)
    header = json.dumps({"hash": b.hash, "start": b.start, "n_tokens": b.n_tokens, "layers": layers}).encode()
    body = MAGIC + struct.pack("<I", len(header)) + header + b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_block(data: bytes, expect_hash: str) -> Block:
    """The block in `data`; ValueError if it is truncated, corrupt, or another block."""
    if len(data) < len(MAGIC) + 8 or not data.startswith(MAGIC):
        raise ValueError("not a block file (truncated?)")
    body, (crc,) = memoryview(data)[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    off = len(MAGIC) + 4
    header = json.loads(bytes(body[off:off + hlen]))
    if header["hash"] != expect_hash:
        raise ValueError("file holds another block")
    off += hlen
    layers = []
    for specs in header["layers"]:
        arrays = []
        for dtype, shape, n in specs:
            arrays.append(_array(body[off:off + n], dtype, shape))
            off += n
        layers.append(tuple(arrays))
    if off != len(body):
        raise ValueError("payload size mismatch")
    return Block(header["hash"], header["start"], header["n_tokens"], layers)


# -- the store -----------------------------------------------------------------------

@dataclass
class DiskHit:
    tokens: np.ndarray          # the entry's tokens (all of them, even when the hit is cut)
    blocks: list[Block]         # the valid prefix of its chain, in order
    own: Optional[list]         # its own part (tail + untrimmable state); None when cut
    complete: bool              # every block and the own part were valid

    @property
    def n_tokens(self) -> int:
        """Tokens this hit can serve."""
        return len(self.tokens) if self.complete else (self.blocks[-1].end if self.blocks else 0)


@dataclass
class _Write:
    key: str
    tokens: np.ndarray
    blocks: list[Block]
    own: list
    meta: dict
    supersedes: list[str]
    nbytes: int
    generation: int


@dataclass
class _Manifests:
    """Every manifest of one namespace directory, as read from disk (cached by name: a
    manifest is immutable once written, only its mtime changes)."""
    chains: dict[str, tuple[list, int]] = field(default_factory=dict)   # key -> (chain, own size)

    def refresh(self, d: Path) -> dict[str, float]:
        """Re-list `d/entries`, read manifests not seen before; key -> mtime of each live one."""
        live = {}
        for p in listdir(d / "entries"):
            name = p.name
            if not name.endswith(".json") or ".tmp" in name:
                continue
            key = name.removesuffix(".json")
            try:
                live[key] = p.stat().st_mtime
                if key not in self.chains:
                    m = json.loads(p.read_text())
                    self.chains[key] = ([tuple(c) for c in m["chain"]], int(m.get("own_size", 0)))
            except (OSError, ValueError, KeyError, TypeError):
                live.pop(key, None)
        for key in set(self.chains) - set(live):
            del self.chains[key]
        return live

    def refs(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for chain, _ in self.chains.values():
            for h, _size in chain:
                out[h] = out.get(h, 0) + 1
        return out


class BlockStore:
    def __init__(self, root: Path, namespace: str, budget: Optional[int], *, orphan_ttl: float,
                 total_budget: Optional[int] = None, write_buffer: int = 512 << 20, sweep: bool = True):
        self.root = Path(root)
        self.dir = self.root / namespace
        self.budget = budget
        self.total_budget = total_budget
        self.write_buffer = write_buffer
        self.lock = threading.Lock()
        self.records: dict[str, dict] = {}        # our view: key -> manifest
        self.refs: dict[str, int] = {}            # block hash -> manifests naming it (our view)
        self.sizes: dict[str, int] = {}           # block hash -> file size
        self.counters = {"writes": 0, "blocks_written": 0, "blocks_deduped": 0, "write_errors": 0,
                         "dropped_writes": 0, "too_large": 0, "evictions": 0, "blocks_freed": 0,
                         "superseded": 0, "corrupt": 0, "corrupt_blocks": 0, "missing_blocks": 0,
                         "loads": 0, "partial_loads": 0}
        self.read_bps: Optional[float] = None     # moving average of actual reads
        self.queue: queue.Queue = queue.Queue()
        self.pending: dict[str, _Write] = {}
        self.queued_bytes = 0
        self.generation = 0
        self.evicted: list[str] = []
        self._manifests: dict[Path, _Manifests] = {}
        self._gc_mutex = threading.RLock()
        self.usable = True
        self._lock_fd: Optional[int] = None
        self._gc_fd: Optional[int] = None
        try:
            self._lock_fd = claim_namespace(self.root, self.dir)
            _private_dir(self.dir / "blocks")
            _private_dir(self.dir / "entries")
            self._gc_fd = os.open(self.dir / ".gc", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.error("prefix cache directory %s is unusable (%s); the disk tier is off", self.dir, e)
            self.usable = False
        else:
            age_out_orphans(self.root, self.dir, orphan_ttl)
        self.thread = threading.Thread(target=self._writer, name="prefix-block-writer", daemon=True)
        self.thread.start()
        if self.usable and sweep:
            self.queue.put("sweep")               # orphan blocks: off start-up, on the writer

    # -- start-up -----------------------------------------------------------------------

    def load_index(self) -> list[dict]:
        """Read every manifest (never a block); rebuild reference counts and unique bytes."""
        if not self.usable:
            return []
        metas = []
        for p in listdir(self.dir / "entries"):
            name = p.name
            if ".tmp" in name:
                if _stale_tmp(name):
                    p.unlink(missing_ok=True)
                continue
            if not name.endswith(".json"):
                continue
            key = name.removesuffix(".json")
            try:
                m = json.loads(p.read_text())
                if m["key"] != key:
                    raise ValueError("manifest of another entry")
                m["chain"] = [tuple(c) for c in m["chain"]]
                m["mtime"] = p.stat().st_mtime
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                self.counters["corrupt"] += 1
                p.unlink(missing_ok=True)
                continue
            metas.append(m)
        with self.lock:
            self.records = {m["key"]: m for m in metas}
            self._recount()
        return [{k: v for k, v in m.items() if k not in ("chain", "tokens")} for m in metas]

    def _recount(self) -> None:
        self.refs, self.sizes = {}, {}
        for m in self.records.values():
            for h, size in m["chain"]:
                self.refs[h] = self.refs.get(h, 0) + 1
                self.sizes[h] = size

    # -- paths --------------------------------------------------------------------------

    def _block_path(self, h: str, d: Optional[Path] = None) -> Path:
        return (d or self.dir) / "blocks" / h[:2] / f"{h}.blk"

    def _entry_path(self, key: str, suffix: str, d: Optional[Path] = None) -> Path:
        return (d or self.dir) / "entries" / f"{key}{suffix}"

    # -- writes (behind the request) ------------------------------------------------------

    def write(self, key: str, tokens, blocks: list[Block], own: list = (), meta: Optional[dict] = None,
              supersedes: list[str] = ()) -> bool:
        """Queue an entry: its chain of `blocks` (only the ones not on disk get written), and
        its `own` part (mlx-lm caches: trimmable layers with the tail, untrimmable layers whole).
        False when it will not be written: tier off, larger than a budget (in the bytes it
        would add), or `write_buffer` bytes already queued."""
        if not self.usable:
            return False
        own = list(own)
        with self.lock:
            new = sum(b.nbytes for b in blocks if b.hash not in self.refs)
        own_bytes = sum(c.nbytes for c in own)
        whole = sum(b.nbytes for b in blocks) + own_bytes
        if not self._fits(whole):
            self.counters["too_large"] += 1
            return False
        nbytes = new + own_bytes
        with self.lock:
            if self.queued_bytes and self.queued_bytes + nbytes > self.write_buffer:
                self.counters["dropped_writes"] += 1
                return False
            item = _Write(key, np.asarray(tokens, dtype=np.int32), list(blocks), own, dict(meta or {}),
                          list(supersedes), nbytes, self.generation)
            self.queued_bytes += nbytes
            self.pending[key] = item
        self.queue.put(item)
        return True

    def _fits(self, nbytes: int) -> bool:
        return all(b is None or nbytes <= b for b in (self.budget, self.total_budget))

    def _writer(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if isinstance(item, _Write):
                    self._write(item)
                elif item == "sweep":
                    self._sweep_orphans()
                else:
                    for key in item:
                        self._drop(key)
            except Exception as e:  # disk full, read-only, vanished directory: drop the entry
                self.counters["write_errors"] += 1
                log.warning("prefix cache entry not written (%s); serving goes on", e)
            finally:
                if isinstance(item, _Write):
                    with self.lock:
                        self.queued_bytes -= item.nbytes
                        if self.pending.get(item.key) is item:
                            del self.pending[item.key]
                self.queue.task_done()
        self.queue.task_done()

    def _write(self, item: _Write) -> None:
        if item.generation != self.generation:
            return
        self._enforce_budget(incoming=item.nbytes)       # needs .gc exclusive: before we share it
        fcntl.flock(self._gc_fd, fcntl.LOCK_SH)
        try:
            chain = []
            for b in item.blocks:
                path = self._block_path(b.hash)
                try:
                    size = path.stat().st_size           # on disk already (ours or a twin's)
                    self.counters["blocks_deduped"] += 1
                except FileNotFoundError:
                    _private_dir(path.parent)
                    data = encode_block(b)
                    _write_atomic(path, data)
                    _fsync_dir(path.parent)
                    size = len(data)
                    self.counters["blocks_written"] += 1
                chain.append((b.hash, size))
            own_size, own_crc = 0, 0
            if item.own:
                own = self._entry_path(item.key, ".own")
                tmp = own.with_name(f"{own.name}.tmp.{os.getpid()}.safetensors")
                save_prompt_cache(str(tmp), item.own)
                os.chmod(tmp, 0o600)
                data = tmp.read_bytes()
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, own)
                own_size, own_crc = len(data), zlib.crc32(data)
            manifest = {"key": item.key, "n_tokens": int(len(item.tokens)), "chain": chain,
                        "own_size": own_size, "own_crc32": own_crc, "created": time.time(),
                        "tokens": base64.b64encode(item.tokens.astype("<i4").tobytes()).decode(), **item.meta}
            _write_atomic(self._entry_path(item.key, ".json"), json.dumps(manifest).encode())
            _fsync_dir(self.dir / "entries")
        finally:
            fcntl.flock(self._gc_fd, fcntl.LOCK_UN)
        manifest["mtime"] = time.time()
        with self.lock:
            void = item.generation != self.generation
            if not void:
                old = self.records.get(item.key)
                if old is not None:
                    self._unref(old)
                self.records[item.key] = manifest
                for h, size in chain:
                    self.refs[h] = self.refs.get(h, 0) + 1
                    self.sizes[h] = size
        if void:
            self._drop(item.key)
            return
        self.counters["writes"] += 1
        for key in item.supersedes:
            self._drop(key)
            self.counters["superseded"] += 1
        self._enforce_budget()

    def _unref(self, m: dict) -> list[str]:
        """Drop `m`'s references (self.lock held); the blocks nothing else names in our view."""
        freed = []
        for h, _ in m["chain"]:
            n = self.refs.get(h, 0) - 1
            if n <= 0:
                self.refs.pop(h, None)
                self.sizes.pop(h, None)
                freed.append(h)
            else:
                self.refs[h] = n
        return freed

    def _drop(self, key: str, corrupt: bool = False, d: Optional[Path] = None) -> None:
        """Remove an entry (manifest first: an entry without one does not exist), then the
        blocks no manifest on disk names any more."""
        d = d or self.dir
        if corrupt:
            self.counters["corrupt"] += 1
        m = None
        if d == self.dir:
            with self.lock:
                m = self.records.pop(key, None)
                if m is not None:
                    self._unref(m)
        manifest = self._entry_path(key, ".json", d)
        if m is None:                    # a twin daemon's entry, or one clear() forgot
            try:
                m = json.loads(manifest.read_text())
            except (OSError, ValueError):
                m = {"chain": []}
        manifest.unlink(missing_ok=True)
        self._entry_path(key, ".own", d).unlink(missing_ok=True)
        if m.get("chain"):
            self._free_blocks(d, [c[0] for c in m["chain"]])

    @contextlib.contextmanager
    def _gc_exclusive(self, d: Path):
        """`d/.gc` exclusive, on a descriptor of its own: our writer's shared hold (another
        descriptor) excludes us too, and so do the threads of this process among themselves."""
        with self._gc_mutex:
            try:
                fd = os.open(d / ".gc", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _free_blocks(self, d: Path, candidates: list[str]) -> None:
        """Unlink the `candidates` no manifest in `d` names, recounted from disk under .gc
        exclusive, so a twin daemon's entry that relies on a block keeps it."""
        with self._gc_exclusive(d):
            mans = self._manifests.setdefault(d, _Manifests())
            mans.refresh(d)
            refs = mans.refs()
            for h in candidates:
                if h not in refs:
                    try:
                        self._block_path(h, d).unlink()
                        self.counters["blocks_freed"] += 1
                    except OSError:
                        pass

    def _enforce_budget(self, incoming: int = 0) -> None:
        """Entry LRU down to the budgets (unique bytes: each block once), leaving room for
        `incoming`. Counts every daemon's manifests in the namespace (and every namespace
        under root for the total budget), as read from disk."""
        for dirs, budget in (([self.dir], self.budget),
                             ([d for d in listdir(self.root) if d.is_dir()], self.total_budget)):
            if budget is None:
                continue
            entries, sizes = [], {}
            for d in dirs:
                mans = self._manifests.setdefault(d, _Manifests())
                live = mans.refresh(d)
                for key, (chain, own_size) in mans.chains.items():
                    entries.append((live[key], d, key, chain, own_size))
                    for h, size in chain:
                        sizes[(d, h)] = size
            refs: dict[tuple, int] = {}
            for _, d, _, chain, _ in entries:
                for h, _ in chain:
                    refs[(d, h)] = refs.get((d, h), 0) + 1
            total = incoming + sum(sizes.values()) + sum(e[4] for e in entries)
            for _, d, key, chain, own_size in sorted(entries, key=lambda e: e[0]):
                if total <= budget:
                    break
                total -= own_size
                for h, _ in chain:
                    refs[(d, h)] -= 1
                    if refs[(d, h)] == 0:
                        total -= sizes[(d, h)]
                self.counters["evictions"] += 1
                if d == self.dir:
                    with self.lock:
                        if key in self.records:
                            self.evicted.append(key)
                self._drop(key, d=d)

    def _sweep_orphans(self) -> None:
        """Blocks no manifest names and older than RECORD_GRACE (a write cut before its
        manifest), and temp files of dead writers. Runs on the writer, never at start-up."""
        now = time.time()
        with self._gc_exclusive(self.dir):
            mans = self._manifests.setdefault(self.dir, _Manifests())
            mans.refresh(self.dir)
            refs = mans.refs()
            for sub in listdir(self.dir / "blocks"):
                for p in listdir(sub):
                    name = p.name
                    try:
                        if ".tmp." in name:
                            pid = name.split(".tmp.", 1)[1].split(".", 1)[0]
                            if not pid.isdigit() or not _alive(int(pid)):
                                p.unlink()
                        elif name.removesuffix(".blk") not in refs and now - p.stat().st_mtime > RECORD_GRACE:
                            p.unlink()
                    except OSError:
                        pass

    # -- reads ------------------------------------------------------------------------

    def load(self, key: str) -> Optional[DiskHit]:
        """The entry, or the valid prefix of its chain when a block is missing or corrupt
        (that block's file is removed and counted, and the entry dropped); None when the
        entry is unknown or not even its first block is valid. Safe off the engine thread."""
        with self.lock:
            item = self.pending.get(key)
            m = self.records.get(key)
        if item is not None:
            return DiskHit(item.tokens, list(item.blocks), copy.deepcopy(item.own), True)
        if m is None:
            return None
        t0, nbytes = time.perf_counter(), 0
        blocks: list[Block] = []
        complete = True
        for h, size in m["chain"]:
            path = self._block_path(h)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                self.counters["missing_blocks"] += 1
                complete = False
                break
            nbytes += len(data)
            try:
                if len(data) != size:
                    raise ValueError(f"size {len(data)}, manifest says {size}")
                blocks.append(decode_block(data, h))
            except (ValueError, KeyError, TypeError, struct.error) as e:
                log.warning("discarding corrupt prefix cache block %s: %s", h, e)
                self.counters["corrupt_blocks"] += 1
                path.unlink(missing_ok=True)
                complete = False
                break
        own = None
        if complete and m.get("own_size"):
            try:
                data = self._entry_path(key, ".own").read_bytes()
                nbytes += len(data)
                if len(data) != m["own_size"] or zlib.crc32(data) != m["own_crc32"]:
                    raise ValueError("size or checksum mismatch")
                buf = io.BytesIO(data)
                buf.name = f"{key}.safetensors"
                own = load_prompt_cache(buf)
            except Exception as e:
                log.warning("discarding prefix cache entry %s's own part: %s", key, e)
                complete = False
        elif complete:
            own = []
        self._measure(nbytes, time.perf_counter() - t0)
        tokens = np.frombuffer(base64.b64decode(m["tokens"]), dtype="<i4").astype(np.int32)
        if not complete:
            self.counters["partial_loads"] += 1
            self._drop(key, corrupt=True)
            if not blocks:
                return None
            return DiskHit(tokens, blocks, None, False)
        self.counters["loads"] += 1
        self.touch(key)
        return DiskHit(tokens, blocks, own, True)

    def _measure(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        bps = nbytes / seconds
        self.read_bps = bps if self.read_bps is None else (1 - BPS_ALPHA) * self.read_bps + BPS_ALPHA * bps

    def has(self, key: str) -> bool:
        with self.lock:
            return key in self.records or key in self.pending

    def touch(self, key: str) -> None:
        with self.lock:
            m = self.records.get(key)
            if m is None:
                return
            m["mtime"] = time.time()
        try:
            os.utime(self._entry_path(key, ".json"))
        except OSError:
            pass

    def supersede(self, keys: list[str]) -> None:
        for key in keys:
            self._drop(key)
            self.counters["superseded"] += 1

    def take_evicted(self) -> list[str]:
        with self.lock:
            out, self.evicted = self.evicted, []
        return out

    # -- admin ------------------------------------------------------------------------

    def flush(self) -> None:
        self.queue.join()

    def clear(self) -> None:
        with self.lock:
            self.generation += 1
            keys = list(self.records)
            self.records, self.refs, self.sizes = {}, {}, {}
            self.pending.clear()
            self.evicted.clear()
        self.queue.put(keys)

    def stats(self) -> dict:
        with self.lock:
            unique = sum(self.sizes.values())
            own = sum(m.get("own_size", 0) for m in self.records.values())
            logical = sum(s for m in self.records.values() for _, s in m["chain"]) + own
            return {"entries": len(self.records), "unique_blocks": len(self.refs),
                    "unique_bytes": unique + own, "logical_bytes": logical,
                    "sharing_ratio": logical / (unique + own) if unique + own else 1.0,
                    "read_bps": self.read_bps, "budget": self.budget, "total_budget": self.total_budget,
                    "pending_writes": self.queue.unfinished_tasks, "queue_bytes": self.queued_bytes,
                    "usable": self.usable, **self.counters}

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("prefix cache: %d entries still queued after %.0fs were not written",
                        len(self.pending), timeout)
        for fd in (self._gc_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._gc_fd = self._lock_fd = None
