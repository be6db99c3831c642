"""The disk tier of the prefix cache: one safetensors file plus one small index record per entry.

Why this shape:
- Files are written behind the request by one writer thread, so a request never waits
  for the disk and a crash loses only what was still queued.
- Each file is written to a temp name, fsynced and renamed; its index record (`.json`,
  with the file's size and CRC-32) is written the same way only after the file is in
  place. An entry without a valid record does not exist, so a kill at any moment leaves
  nothing that loads wrong; a bit flip or truncation fails the CRC and the entry is
  discarded and counted, never served.
- Entries live under a namespace directory named by the model fingerprint, so different
  weights never read each other's KV. Namespaces of models no longer served age out.
- Start-up reads only the small records, never the tensors.
- Two workers can share a namespace (two configured models with the same weights, or a
  replacement worker starting beside the one it replaces), so start-up removes only
  leftovers that no live writer can still finish: temp files of dead processes and files
  whose record is overdue. An entry the other worker evicted is simply gone, not corrupt.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

log = logging.getLogger("mlxd.prefix_cache")

_SUFFIX = ".safetensors"
RECORD_GRACE = 300.0     # a file without its record for this long was cut mid-write


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DiskTier:
    def __init__(self, root: Path, namespace: str, budget: int, *, orphan_ttl: float):
        self.root = root
        self.dir = root / namespace
        self.budget = budget
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.counters = {"writes": 0, "write_errors": 0, "evictions": 0, "superseded": 0, "corrupt": 0, "loads": 0}
        self.queue: queue.Queue = queue.Queue()
        self.usable = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.utime(self.dir)
            self._age_out_orphans(orphan_ttl)
        except OSError as e:
            log.error("prefix cache directory %s is unusable (%s); the disk tier is off", self.dir, e)
            self.usable = False
        self.thread = threading.Thread(target=self._writer, name="prefix-cache-writer", daemon=True)
        self.thread.start()

    # -- start-up -----------------------------------------------------------------------

    def _age_out_orphans(self, ttl: float) -> None:
        """Namespaces untouched for `ttl` belong to models no longer served: remove them."""
        now = time.time()
        for d in self.root.iterdir():
            if d.is_dir() and d != self.dir and now - d.stat().st_mtime > ttl:
                log.info("removing prefix cache of a model not served for %.0f days: %s", ttl / 86400, d)
                shutil.rmtree(d, ignore_errors=True)

    def load_index(self) -> list[dict]:
        """Read every entry's record (not its tensors); drop leftovers of interrupted writes."""
        if not self.usable:
            return []
        metas = []
        for p in self.dir.iterdir():
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
                    meta["mtime"] = p.stat().st_mtime
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

    def write(self, key: str, tokens: np.ndarray, cache: list, meta: dict, supersedes: list[str] = ()) -> None:
        """Queue an entry; the entries it `supersedes` are removed once it is durable."""
        if self.usable:
            self.queue.put((key, tokens, cache, meta, list(supersedes)))

    def supersede(self, keys: list[str]) -> None:
        for key in keys:
            self._discard(key)
            self.counters["superseded"] += 1

    def _writer(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                self._write(*item)
            except Exception as e:  # disk full, read-only, vanished directory: drop the entry
                self.counters["write_errors"] += 1
                log.warning("prefix cache entry not written (%s); serving goes on", e)
                for p in self.dir.glob(f"{item[0]}*"):
                    p.unlink(missing_ok=True)
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def _write(self, key: str, tokens: np.ndarray, cache: list, meta: dict, supersedes: list[str]) -> None:
        path = self.dir / f"{key}{_SUFFIX}"
        tmp = self.dir / f"{key}.tmp.{os.getpid()}{_SUFFIX}"
        save_prompt_cache(str(tmp), cache, metadata={
            "key": key, "tokens": base64.b64encode(tokens.astype("<i4").tobytes()).decode()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        crc = _crc32(tmp)
        os.replace(tmp, path)
        record = {"key": key, "n_tokens": int(len(tokens)), "size": size, "crc32": crc,
                  "created": time.time(), **meta}
        _write_atomic(self.dir / f"{key}.json", json.dumps(record).encode())
        _fsync_dir(self.dir)
        record["mtime"] = time.time()
        with self.lock:
            self.records[key] = record
        self.counters["writes"] += 1
        self.supersede(supersedes)
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        """LRU down to the budget over the whole namespace: a twin worker's entries (same
        weights) count too, so sizes and ages come from the directory, not only our records."""
        entries = self._scan()
        total = sum(size for size, _ in entries.values())
        for key in sorted(entries, key=lambda k: entries[k][1]):
            if total <= self.budget:
                break
            self._discard(key)
            self.counters["evictions"] += 1
            total -= entries[key][0]

    def _scan(self) -> dict[str, tuple[int, float]]:
        """key -> (file size, last use) for every complete entry on disk."""
        out = {}
        for p in self.dir.glob("*.json"):
            key = p.name.removesuffix(".json")
            try:
                out[key] = ((self.dir / f"{key}{_SUFFIX}").stat().st_size, p.stat().st_mtime)
            except OSError:
                continue      # mid-write or just evicted
        return out

    # -- reads ------------------------------------------------------------------------

    def load(self, key: str) -> Optional[tuple[np.ndarray, list]]:
        """The entry's tokens and cache, or None (and the entry is gone) if it fails its checks."""
        with self.lock:
            record = self.records.get(key)
        if record is None:
            return None     # evicted by the budget meanwhile
        path = self.dir / f"{key}{_SUFFIX}"
        try:
            size = path.stat().st_size
        except FileNotFoundError:     # evicted by another worker sharing this namespace
            self._discard(key)
            return None
        try:
            if size != record["size"] or _crc32(path) != record["crc32"]:
                raise ValueError("size or checksum mismatch")
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
            tokens = np.frombuffer(base64.b64decode(meta["tokens"]), dtype="<i4").astype(np.int32)
            if meta.get("key") != key or len(tokens) != record["n_tokens"]:
                raise ValueError("file belongs to another entry")
        except Exception as e:
            log.warning("discarding prefix cache entry %s: %s", key, e)
            self._discard(key, corrupt=True)
            return None
        self.counters["loads"] += 1
        self.touch(key)
        return tokens, cache

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

    def _discard(self, key: str, corrupt: bool = False) -> None:
        if corrupt:
            self.counters["corrupt"] += 1
        with self.lock:
            self.records.pop(key, None)
        for suffix in (".json", _SUFFIX):
            try:
                (self.dir / f"{key}{suffix}").unlink()
            except OSError:
                pass

    # -- admin ------------------------------------------------------------------------

    def flush(self) -> None:
        self.queue.join()

    def clear(self) -> None:
        self.flush()
        with self.lock:
            keys = list(self.records)
        for key in keys:
            self._discard(key)

    def stats(self) -> dict:
        with self.lock:
            return {"entries": len(self.records), "bytes": sum(r["size"] for r in self.records.values()),
                    "budget": self.budget, "pending_writes": self.queue.unfinished_tasks, "usable": self.usable,
                    **self.counters}

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)
