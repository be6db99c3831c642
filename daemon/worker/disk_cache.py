"""The disk tier of the prefix cache: one safetensors file plus one small index record per entry.

Why this shape:
- Files are written behind the request by one writer thread, so a request never waits
  for the disk and a crash loses only what was still queued.
- Each file is written to a temp name, fsynced and renamed; its index record (`.json`,
  with the file's size and CRC-32) is written the same way only after the file is in
  place. An entry without a valid record does not exist, so a kill at any moment leaves
  nothing that loads wrong; a bit flip or truncation fails the CRC and the entry is
  discarded and counted, never served.
- Entries live under a namespace directory named by the model fingerprint (and the mlx and
  mlx-lm versions), so different weights never read each other's KV. Namespaces of models
  no longer served age out after `orphan_ttl`; an optional budget over the whole directory
  evicts the least recently used entries of any namespace.
- Start-up reads only the small records, never the tensors. A promotion reads a file once:
  the bytes are checksummed and parsed from memory, on the caller's thread (the prefix
  cache's loader thread), never the engine's.
- The queue of writes is bounded in bytes (the memory tier no longer counts an entry once
  it is evicted, but the queue still holds its arrays): past the bound an entry is not
  written, and counted. Dropping beats back-pressure here: waiting for the disk would stall
  every decoding stream, while a dropped entry costs only a recomputation, later.
- An entry larger than the budget (the namespace's or the directory's) is not written, and
  counted (`too_large`): making room for it would evict every other entry, and it would
  still not fit. Files are 0600 and directories 0700: prompts are the user's.
- Two workers can share a namespace (two configured models with the same weights, or a
  replacement worker starting beside the one it replaces), so start-up removes only
  leftovers that no live writer can still finish: temp files of dead processes and files
  whose record is overdue. An entry the other worker evicted is simply gone, not corrupt.
- In a pipeline group each rank writes its own layers' shard, in its stage's namespace; the
  stage is written in the record and in the file's metadata too, so a shard that ends up
  under another rank's name (copied or renamed by hand) is discarded as corrupt, never served.
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
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

log = logging.getLogger("mlxd.prefix_cache")

_SUFFIX = ".safetensors"
RECORD_GRACE = 300.0     # a file without its record for this long was cut mid-write
CLOSE_TIMEOUT = 20.0     # well within the daemon's stop timeout: a slow disk loses the queue, not the shutdown


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_tmp(name: str) -> bool:
    """`<key>.tmp.<pid>.safetensors` or `<key>.json.tmp.<pid>`: stale once its writer is gone."""
    parts = name.split(".tmp.", 1)
    if len(parts) != 2:
        return False
    pid = parts[1].split(".", 1)[0]
    return not pid.isdigit() or not _alive(int(pid))


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0        # vanished meanwhile (evicted, renamed, cleared by another worker)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0      # removed meanwhile by another worker's orphan sweep


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _private_dir(path: Path) -> None:
    """Create `path` (and its missing parents) 0700, and make an existing one 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path` whole or not at all; a failed write (a full disk) removes its temp file,
    which no start-up sweep would take while this process lives."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def claim_namespace(root: Path, d: Path) -> int:
    """Create the namespace `d` under `root` and hold a shared lock on it for life (the fd
    returned), so another worker's orphan sweep never removes a namespace in use, however long
    it sat idle. A sweep that removed the directory just before we locked it leaves us a lock
    on a deleted file: then start over."""
    for _ in range(5):
        _private_dir(root)
        _private_dir(d)
        lock = d / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.utime(d)
            return fd
        os.close(fd)
    raise OSError(f"{d} keeps vanishing")


def age_out_orphans(root: Path, keep: Path, ttl: float) -> None:
    """Namespaces under `root` other than `keep`, untouched for `ttl` and not locked by a live
    worker, belong to models no longer served: remove them. Workers starting together sweep at
    the same time, so whatever vanishes meanwhile is simply gone, never an error."""
    now = time.time()
    try:
        dirs = list(root.iterdir())
    except OSError as e:
        log.warning("cannot list %s to age out old prefix caches: %s", root, e)
        return
    for d in dirs:
        try:
            if d == keep or d.is_symlink() or not d.is_dir() or now - d.stat().st_mtime <= ttl:
                continue
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue            # removed by another sweep meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue            # a live worker holds it
        try:
            log.info("removing prefix cache of a model not served for %.1f days: %s", ttl / 86400, d)
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


MODEL_FILE = ".model"        # which model (and stage) a namespace belongs to: for the miss reason


def _model_tag(model: str, stage: Optional[str]) -> bytes:
    return json.dumps({"model": model, "stage": stage}).encode()


def mark_model(d: Path, model: str, stage: Optional[str]) -> None:
    """Name the model a namespace is of, so a later revision of the same model can say that
    the cache it lacks is under another namespace (weights, template or numerics changed)."""
    data = _model_tag(model, stage)
    try:
        if (d / MODEL_FILE).read_bytes() == data:
            return
    except OSError:
        pass
    _write_atomic(d / MODEL_FILE, data)


def other_revisions(root: Path, keep: Path, model: str, stage: Optional[str],
                    limit: int) -> dict[str, str]:
    """Block hash -> namespace of the entries other namespaces of the same model and stage hold
    (at most `limit` hashes, newest namespaces first): their cache can never serve this one,
    and a miss they would have hit says so. Only records are read. A hash's depth needs no
    keeping: block hashes are chained, so one names the same position in every record."""
    out: dict[str, str] = {}
    mine = _model_tag(model, stage)
    dirs = [d for d in listdir(root) if d != keep and d.is_dir() and not d.is_symlink()]
    for d in sorted(dirs, key=_mtime, reverse=True):
        try:
            if (d / MODEL_FILE).read_bytes() != mine:
                continue
        except OSError:
            continue
        for p in listdir(d):
            if not p.name.endswith(".json") or ".tmp" in p.name:
                continue
            try:
                blocks = json.loads(p.read_text())["blocks"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for h in blocks:
                if isinstance(h, str):
                    out.setdefault(h, d.name)      # the newest namespace holding it
            if len(out) >= limit:
                return out
    return out


def listdir(d: Path) -> list[Path]:
    """A directory's entries, or none when it is gone or unreadable (another daemon's sweep)."""
    try:
        return list(d.iterdir())
    except OSError:
        return []


@dataclass
class _Write:
    key: str
    tokens: np.ndarray
    cache: list
    meta: dict
    supersedes: list[str]
    nbytes: int
    generation: int


class DiskTier:
    def __init__(self, root: Path, namespace: str, budget: int, *, orphan_ttl: float,
                 total_budget: Optional[int] = None, write_buffer: int = 512 << 20,
                 stage: Optional[str] = None, evict: bool = True, track_evictions: bool = False,
                 model: str = ""):
        self.root = root
        self.stage = stage                        # Stage.tag of a pipeline rank's shards
        self.evict = evict                        # False: a follower rank, whose rank 0 decides
        self.track_evictions = track_evictions
        self.evicted: list[str] = []              # the budget's evictions, for take_evicted()
        self.dir = root / namespace
        self.budget = budget
        self.total_budget = total_budget          # over every namespace under root
        self.write_buffer = write_buffer
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.counters = {"writes": 0, "write_errors": 0, "dropped_writes": 0, "too_large": 0, "evictions": 0,
                         "superseded": 0, "corrupt": 0, "loads": 0}
        self.queue: queue.Queue = queue.Queue()
        self.pending: dict[str, _Write] = {}     # queued or being written: readable before they land
        self.queued_bytes = 0
        self.generation = 0                      # bumped by clear(): writes queued before it are void
        self.usable = True
        self._lock_fd: Optional[int] = None
        try:
            self._lock_fd = claim_namespace(self.root, self.dir)
        except OSError as e:
            log.error("prefix cache directory %s is unusable (%s); the disk tier is off", self.dir, e)
            self.usable = False
        else:
            age_out_orphans(self.root, self.dir, orphan_ttl)
            if model:
                try:
                    mark_model(self.dir, model, stage)
                except OSError as e:
                    log.warning("cannot name the model of %s: %s", self.dir, e)
        self.thread = threading.Thread(target=self._writer, name="prefix-cache-writer", daemon=True)
        self.thread.start()

    # -- start-up -----------------------------------------------------------------------

    def load_index(self) -> list[dict]:
        """Read every entry's record (not its tensors); drop leftovers of interrupted writes."""
        if not self.usable:
            return []
        metas = []
        for p in listdir(self.dir):
            name = p.name
            if ".tmp" in name:
                if _stale_tmp(name):
                    p.unlink(missing_ok=True)
            elif name.endswith(".json"):
                try:
                    meta = json.loads(p.read_text())
                    key = meta["key"]
                    if key != name.removesuffix(".json") or not (self.dir / f"{key}{_SUFFIX}").exists():
                        raise ValueError("record without its file")
                    if meta.get("stage") != self.stage:
                        raise ValueError(f"a shard of stage {meta.get('stage')}, not {self.stage}")
                    meta["mtime"] = p.stat().st_mtime
                except FileNotFoundError:
                    continue                  # evicted by another worker meanwhile
                except (OSError, ValueError, KeyError, TypeError):
                    self._discard(name.removesuffix(".json"), corrupt=True)
                    continue
                metas.append(meta)
        known = {m["key"] for m in metas}
        for p in self.dir.glob(f"*{_SUFFIX}"):
            if ".tmp" not in p.name and p.name.removesuffix(_SUFFIX) not in known:
                try:
                    if time.time() - p.stat().st_mtime > RECORD_GRACE:
                        p.unlink()            # its record never landed: the write was cut
                except OSError:
                    pass
        with self.lock:
            self.records = {m["key"]: m for m in metas}
        return metas

    # -- writes (behind the request) ------------------------------------------------------

    def write(self, key: str, tokens: np.ndarray, cache: list, meta: dict, supersedes: list[str] = ()) -> bool:
        """Queue an entry; the entries it `supersedes` are removed once it is durable. False
        when it will not be written: the tier is off, it is larger than a budget, or
        `write_buffer` bytes are queued already (an entry alone in the queue is taken
        whatever its size)."""
        if not self.usable:
            return False
        nbytes = sum(c.nbytes for c in cache)
        if not self._fits(nbytes):
            self.counters["too_large"] += 1
            return False
        with self.lock:
            if self.queued_bytes and self.queued_bytes + nbytes > self.write_buffer:
                self.counters["dropped_writes"] += 1
                return False
            item = _Write(key, tokens, cache, meta, list(supersedes), nbytes, self.generation)
            self.queued_bytes += nbytes
            self.pending[key] = item
        self.queue.put(item)
        return True

    def _fits(self, nbytes: int) -> bool:
        return all(b is None or nbytes <= b for b in (self.budget, self.total_budget))

    def supersede(self, keys: list[str]) -> None:
        for key in keys:
            self._discard(key)
            self.counters["superseded"] += 1

    def _writer(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if isinstance(item, _Write):
                    self._write(item)
                else:
                    for key in item:          # clear(): the files of entries already forgotten
                        self._discard(key)
            except Exception as e:  # disk full, read-only, vanished directory: drop the entry
                self.counters["write_errors"] += 1
                log.warning("prefix cache entry not written (%s); serving goes on", e)
                if isinstance(item, _Write):
                    for p in self.dir.glob(f"{item.key}*"):
                        p.unlink(missing_ok=True)
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
            return                                # cleared while queued
        key, tokens = item.key, item.tokens
        path = self.dir / f"{key}{_SUFFIX}"
        tmp = self.dir / f"{key}.tmp.{os.getpid()}{_SUFFIX}"
        self._enforce_budget(incoming=item.nbytes)     # room first: the temp file counts too
        meta = {"key": key, "tokens": base64.b64encode(tokens.astype("<i4").tobytes()).decode()}
        if self.stage is not None:
            meta["stage"] = self.stage
        save_prompt_cache(str(tmp), item.cache, metadata=meta)
        os.chmod(tmp, 0o600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        if not self._fits(size):                  # the arrays fitted, the file (header, tokens) does not
            tmp.unlink(missing_ok=True)
            self.counters["too_large"] += 1
            return
        crc = _crc32(tmp)
        os.replace(tmp, path)
        record = {"key": key, "n_tokens": int(len(tokens)), "size": size, "crc32": crc,
                  "created": time.time(), **item.meta}
        if self.stage is not None:
            record["stage"] = self.stage
        _write_atomic(self.dir / f"{key}.json", json.dumps(record).encode())
        _fsync_dir(self.dir)
        record["mtime"] = time.time()
        with self.lock:
            void = item.generation != self.generation
            if not void:
                self.records[key] = record
        if void:                                  # cleared while being written
            self._discard(key)
            return
        self.counters["writes"] += 1
        self.supersede(item.supersedes)
        self._enforce_budget()

    def _enforce_budget(self, incoming: int = 0) -> None:
        """LRU down to the budgets, leaving room for `incoming` bytes about to be written.
        Sizes and ages come from the directory, not our records: a twin worker's entries (same
        weights) count against the namespace's budget, every namespace's against the total,
        and files still being written (ours or another's) count but are never evicted.
        A follower rank (evict=False) leaves it to its rank 0."""
        if not self.evict:
            return
        for dirs, budget in (([self.dir], self.budget),
                             ([d for d in listdir(self.root) if d.is_dir()], self.total_budget)):
            if budget is None:
                continue
            entries, in_flight = self._scan(dirs)
            total = in_flight + incoming + sum(size for size, _ in entries.values())
            for d, key in sorted(entries, key=lambda k: entries[k][1]):
                if total <= budget:
                    break
                self._discard(key, d=d)
                self.counters["evictions"] += 1
                if self.track_evictions and d == self.dir:
                    with self.lock:
                        self.evicted.append(key)
                total -= entries[(d, key)][0]

    @staticmethod
    def _scan(dirs: list[Path]) -> tuple[dict[tuple[Path, str], tuple[int, float]], int]:
        """(dir, key) -> (file size, last use) for complete entries; bytes of files without a record."""
        entries, in_flight = {}, 0
        for d in dirs:
            sizes, used = {}, {}
            for p in listdir(d):
                try:
                    if p.name.endswith(".json") and ".tmp" not in p.name:
                        used[p.name.removesuffix(".json")] = p.stat().st_mtime
                    elif p.name.endswith(_SUFFIX):
                        sizes[p.name.removesuffix(_SUFFIX)] = p.stat().st_size
                except OSError:
                    continue      # evicted or renamed meanwhile
            for name, size in sizes.items():
                if name in used:
                    entries[(d, name)] = (size, used[name])
                else:
                    in_flight += size
        return entries, in_flight

    # -- reads ------------------------------------------------------------------------

    def load(self, key: str) -> Optional[tuple[np.ndarray, list]]:
        """The entry's tokens and cache, or None (and the entry is gone) if it fails its checks.

        Safe off the engine thread. The file is read once: its bytes are checked and then
        parsed from memory (mx.load picks the format by the file-like object's name)."""
        with self.lock:
            item = self.pending.get(key)
            record = self.records.get(key)
        if item is not None:          # still queued for the disk: a copy of the queue's (the writer reads it)
            return item.tokens, copy.deepcopy(item.cache)
        if record is None:
            return None     # evicted by the budget meanwhile
        path = self.dir / f"{key}{_SUFFIX}"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:     # evicted by another worker sharing the directory
            self._discard(key)
            return None
        try:
            if len(data) != record["size"] or zlib.crc32(data) != record["crc32"]:
                raise ValueError("size or checksum mismatch")
            buf = io.BytesIO(data)
            buf.name = path.name
            cache, meta = load_prompt_cache(buf, return_metadata=True)
            tokens = np.frombuffer(base64.b64decode(meta["tokens"]), dtype="<i4").astype(np.int32)
            if meta.get("key") != key or len(tokens) != record["n_tokens"]:
                raise ValueError("file belongs to another entry")
            if meta.get("stage") != self.stage:
                raise ValueError(f"a shard of stage {meta.get('stage')}, not {self.stage}")
        except Exception as e:
            log.warning("discarding prefix cache entry %s: %s", key, e)
            self._discard(key, corrupt=True)
            return None
        self.counters["loads"] += 1
        self.touch(key)
        return tokens, cache

    def has(self, key: str) -> bool:
        """Whether the entry is written (its record is in place) or queued to be."""
        with self.lock:
            return key in self.records or key in self.pending

    def take_evicted(self) -> list[str]:
        with self.lock:
            out, self.evicted = self.evicted, []
        return out

    def touch(self, key: str) -> None:
        with self.lock:
            record = self.records.get(key)
            if record is None:
                return
            record["mtime"] = time.time()
        try:
            os.utime(self.dir / f"{key}.json")
        except OSError:
            pass

    def _discard(self, key: str, corrupt: bool = False, d: Optional[Path] = None) -> None:
        """Remove an entry, record first (an entry without one does not exist)."""
        d = d or self.dir
        if corrupt:
            self.counters["corrupt"] += 1
        if d == self.dir:
            with self.lock:
                self.records.pop(key, None)
        for suffix in (".json", _SUFFIX):
            try:
                (d / f"{key}{suffix}").unlink()
            except OSError:
                pass

    # -- admin ------------------------------------------------------------------------

    def flush(self) -> None:
        self.queue.join()

    def clear(self) -> None:
        """Forget every entry at once; their files go on the writer thread, so the engine never
        waits for the disk. Writes still queued are void."""
        with self.lock:
            self.generation += 1
            keys = list(self.records)
            self.records.clear()
            self.pending.clear()
            self.evicted.clear()
        self.queue.put(keys)

    def stats(self) -> dict:
        with self.lock:
            return {"entries": len(self.records), "bytes": sum(r["size"] for r in self.records.values()),
                    "budget": self.budget, "total_budget": self.total_budget,
                    "pending_writes": self.queue.unfinished_tasks, "queue_bytes": self.queued_bytes,
                    "write_buffer": self.write_buffer, "usable": self.usable, **self.counters}

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Finish the queued writes, for at most `timeout`; what is left is lost, and logged."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            with self.lock:
                n, nbytes = len(self.pending), self.queued_bytes
            log.warning("prefix cache: %d entries (%.1f MB) still queued after %.0fs were not written",
                        n, nbytes / 1e6, timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
