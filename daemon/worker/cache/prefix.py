"""The per-model prefix cache: KV snapshots keyed by token prefix, in memory and on disk.

Lookups go through chained block hashes (as in vLLM): block i's hash covers tokens
[0, (i+1)*BLOCK), so the deepest hash a request shares with an entry bounds their common
prefix from below; the exact common prefix is then measured on the tokens themselves.
An entry can be reused for any prefix of itself when its cache is trimmable (plain KV);
caches that cannot be trimmed (rotating windows, recurrent state) are reused only as a
whole and only when they are a strict prefix of the request, so output never changes (a
wrapped window can still give back the one token it holds beyond what the next attends
to: `trim_room`). For those the engine also stores checkpoints mid-prefill
(`checkpoints.py`), ordinary entries; a lookup goes from the deepest shared block to
shallower ones while the deeper entries cannot serve, so the nearest checkpoint is found.
Each lookup leaves an `Outcome`: what it served and, for less than the cache shares with
the prompt, why (`events.CACHE_MISS_REASONS`).

The memory tier holds mlx-lm cache objects under an LRU byte budget; the disk tier
(`disk_cache.DiskTier`) keeps every stored entry too, written behind the request, and is
consulted when it knows a longer prefix than memory. A disk hit is promoted to memory,
or served from disk alone when it is larger than the memory budget. The engine never reads
the disk: `fetch_nowait` hands it a Future for the read, done on a loader thread.

A trimmable entry serves every prefix of itself, so storing turn N of a conversation
supersedes turns 1..N-1 in both tiers (on disk once turn N is durably written): a long chat
costs the disk its last snapshot, not the sum of all of them.

In a pipeline group (`stage` given) each rank keeps its own layers' shard of every entry,
under the same key (the hash of the tokens is the same on every rank), in a namespace of
its own stage: ranks sharing a cache directory never meet, and a record or file that names
another stage is discarded as corrupt, never served (the shapes would match; the KV would
be garbage). Rank 0 resolves prefixes and decides what goes; the followers (`follower=True`)
never drop an entry on their own, serve rank 0's hits by key (`fetch_key`) and drop what
rank 0's `evicted_keys()` says it dropped.

Namespaces (`ns`, named by the daemon per API key and `cache_salt`) seed the chained block
hashes and every entry's key, so entries of two namespaces never share a block or a key
and can never match; the sub-block fallback, which looks at memory entries one by one,
compares their namespace. The empty namespace hashes exactly as before, so existing disk
entries stay valid.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache

from ..disk_cache import DiskTier, other_revisions
from .index import BLOCK, Entry, Outcome, _key, block_hashes, common_prefix, namespace
from .kv import compact, dequantize, quantize, trim, trim_room
from .memory import BlockPool

log = logging.getLogger("mlxd.prefix_cache")

EVICTED_BLOCKS = 1 << 16     # block hashes of evicted entries remembered, to say "evicted"


class PrefixCache:
    def __init__(self, model, *, fingerprint: str, root: Path, memory_budget: int, disk_budget: int,
                 kv_bits: Optional[int] = None, orphan_ttl: float = 7 * 86400,
                 total_disk_budget: Optional[int] = None, write_buffer: int = 512 << 20,
                 stage=None, follower: bool = False, block_tokens: int = 256, model_name: str = ""):
        self.model = model
        self.stage = stage.tag if stage is not None else None
        self.follower = follower
        self._track = stage is not None and not follower   # rank 0 of a group reports what it drops
        self._evicted: list[str] = []
        self.kv_bits = kv_bits
        self.memory_budget = memory_budget
        self.entries: dict[str, Entry] = {}
        self.by_block: dict[str, set[str]] = {}
        self.memory: OrderedDict[str, Entry] = OrderedDict()   # LRU order, oldest first
        self.pool = BlockPool(block_tokens)   # the memory tier's KV blocks, shared between entries
        self._own_bytes = 0                   # the memory entries' tails and untrimmable layers
        self.running_bytes = 0                # KV the running requests hold (`fit_running`)
        self.counters = {"queries": 0, "query_tokens": 0, "hits": 0, "hit_tokens": 0,
                         "memory_hit_tokens": 0, "disk_hit_tokens": 0, "misses": 0,
                         "memory_evictions": 0, "stores": 0, "store_errors": 0, "too_large_for_memory": 0}
        self.last_key: Optional[str] = None     # the entry the last hit came from
        self.last_outcome = Outcome()           # what the last lookup found, and why not more
        self.evicted_blocks: OrderedDict[str, None] = OrderedDict()   # of entries the budgets dropped
        self._unreadable: Optional[str] = None  # an entry whose read failed during this lookup
        self.reads: dict[str, Future] = {}       # disk entries being read off the engine thread
        self._loader: Optional[ThreadPoolExecutor] = None
        self.disk: Optional[DiskTier] = None
        self.revisions: dict[str, str] = {}   # block hash -> namespace of another revision of this model
        if disk_budget > 0:
            self.disk = DiskTier(Path(root), namespace(fingerprint, kv_bits, stage), disk_budget,
                                 orphan_ttl=orphan_ttl, total_budget=total_disk_budget, write_buffer=write_buffer,
                                 stage=self.stage, evict=not follower, track_evictions=True, model=model_name)
            for meta in self.disk.load_index():
                self._index(Entry(key=meta["key"], tokens=None, n_tokens=meta["n_tokens"], blocks=meta["blocks"],
                                  trimmable=meta["trimmable"], room=meta.get("room", 0), on_disk=True,
                                  stage=meta.get("stage")))
            if model_name and self.disk.usable:
                self.revisions = other_revisions(Path(root), self.disk.dir, model_name, self.stage, EVICTED_BLOCKS)

    # -- index ------------------------------------------------------------------------

    def _index(self, e: Entry) -> None:
        self.entries[e.key] = e
        for h in e.blocks:
            self.by_block.setdefault(h, set()).add(e.key)

    def _unindex(self, e: Entry) -> None:
        if self.entries.get(e.key) is e:
            del self.entries[e.key]
            if self._track:
                self._evicted.append(e.key)
        for h in e.blocks:
            keys = self.by_block.get(h)
            if keys is not None and self.entries.get(e.key) is None:
                keys.discard(e.key)
                if not keys:
                    del self.by_block[h]

    def _candidates(self, hashes: list[str], ns: str):
        """Entries by the depth of the block they share with the request, deepest first, as
        (depth in tokens, entries not given yet); else those in memory (a short prefix, under
        one block, can only be found by looking). An entry not given by depth d shares fewer
        than d tokens, so a caller holding a hit that long can stop."""
        seen: set[str] = set()
        recency: Optional[dict[str, int]] = None
        for i in range(len(hashes) - 1, -1, -1):
            keys = self.by_block.get(hashes[i])
            if keys:
                new = [self.entries[k] for k in keys - seen if k in self.entries]
                if len(new) > 1:
                    # Ties go to the most recently used: the hit refreshes the session being
                    # continued, not whichever sharer a set (string hashes vary by process) gave first.
                    recency = recency or {k: j for j, k in enumerate(self.memory)}
                    new.sort(key=lambda e: (-recency.get(e.key, -1), e.key))
                seen |= keys
                yield (i + 1) * BLOCK, new
        if not seen:
            yield 0, [e for e in self.memory.values() if e.ns == ns]

    # -- lookup -----------------------------------------------------------------------

    def fetch(self, tokens: list[int], ns: str = "") -> tuple[Optional[list], int, Optional[str]]:
        """A fresh cache for the longest usable prefix of `tokens` (at most len-1) among the
        entries of namespace `ns`, its length, its tier.
        A disk hit is read on this thread: the engine uses `fetch_nowait`."""
        return self._fetch(tokens, wait=True, ns=ns)

    def fetch_nowait(self, tokens: list[int], ns: str = "") -> "tuple[Optional[list], int, Optional[str]] | Future":
        """As `fetch`, but when the best hit must be read from disk first, the read starts on the
        loader thread and its Future comes back instead: call again once it is done."""
        return self._fetch(tokens, wait=False, ns=ns)

    def _fetch(self, tokens, wait: bool, ns: str):
        arr = np.asarray(tokens, dtype=np.int32)
        limit = len(arr) - 1   # the last prompt token must be computed to get logits
        self._unreadable = None
        self._sync_disk()
        hashes = block_hashes(arr, ns=ns)      # once per lookup: each candidate's depth is read off them
        while True:
            best, shared, nearest = self._best(arr, hashes, limit, ns)
            self.last_key = None
            if best is None:
                self._explain(arr, hashes, 0, None, None, shared, nearest)
                return self._hit(tokens, None, 0, None)
            if best.mem is not None:
                src, src_tokens, tier = None, best.tokens, "memory"
                break
            loaded = self._read(best, wait)
            if isinstance(loaded, Future):
                return loaded
            if loaded is None or self.entries.get(best.key) is not best:   # corrupt, vanished or cleared
                self._unindex(best)
                self._unreadable = best.key
                continue
            src_tokens, src = loaded
            best.ns = ns              # found by blocks seeded with ns: it is of ns
            self._install(best, src_tokens, src)     # served from the read alone when too large for memory
            tier = "disk"
            break
        n = min(common_prefix(src_tokens, arr), limit)
        if not self._usable(best, n):
            self._explain(arr, hashes, 0, None, None, max(shared, n), best.key)
            return self._hit(tokens, None, 0, None)
        # Once installed, a disk hit is served from the pool too: its own layers are kept, not cut.
        cache = self._restore(best, n) if best.mem is not None else self._cut(src, best, n)
        if best.mem is not None:
            self.memory.move_to_end(best.key)
        if best.on_disk and self.disk is not None:
            self.disk.touch(best.key)
        self.last_key = best.key
        self._explain(arr, hashes, n, tier, best.key, max(shared, n), nearest if shared > n else best.key)
        return self._hit(tokens, dequantize(cache) if self.kv_bits else cache, n, tier)

    def _explain(self, arr: np.ndarray, hashes: list[str], n: int, tier, key, shared: int, nearest) -> None:
        """The lookup's `Outcome`: what it served and, for less than the cache shares, why."""
        o = Outcome(tokens=n, tier=tier, entry=key, shared=shared, nearest=nearest)
        evicted = self._evicted_depth(hashes)
        if shared > n:
            o.reason = "untrimmable"
            o.detail = (f"entry {nearest} shares {shared} tokens with the prompt, but its cache cannot be trimmed "
                        f"(sliding window or recurrent state); " +
                        (f"served the nearest checkpoint, {n} tokens" if n else "no checkpoint at or before that"))
        elif self._unreadable is not None and n == 0:
            o.reason = "unreadable"
            o.detail = f"entry {self._unreadable} could not be read from disk (gone or corrupt)"
        elif (rev := self._revision_depth(hashes)) and rev[1] > n:
            o.reason = "revision"
            o.detail = (f"the cache of another revision of this model ({rev[0]}: its weights, tokenizer or chat "
                        f"template, kv_bits or mlx/mlx-lm version differ) shares {rev[1]} tokens with the "
                        f"prompt; a changed model never reads it")
        elif evicted > n:
            o.reason = "evicted"
            o.detail = f"an entry sharing at least {evicted} tokens was evicted by the cache budgets"
        elif n == 0:
            o.reason = "cold"
            o.detail = "nothing cached shares a prefix with this prompt"
        else:
            o.detail = f"{n} tokens from entry {key} ({tier})" + (
                f"; the prompt diverges from it at token {n}" if n < len(arr) - 1 else "")
        self.last_outcome = o

    @staticmethod
    def _deepest(hashes: list[str], known) -> int:
        """How many of the prompt's blocks lead up to the deepest one in `known` (0: none)."""
        if known:
            for i in range(len(hashes) - 1, -1, -1):
                if hashes[i] in known:
                    return i + 1
        return 0

    def _revision_depth(self, hashes: list[str]) -> Optional[tuple[str, int]]:
        """(namespace, tokens) of the deepest block another revision of this model caches."""
        i = self._deepest(hashes, self.revisions)
        return (self.revisions[hashes[i - 1]], i * BLOCK) if i else None

    def _evicted_depth(self, hashes: list[str]) -> int:
        return self._deepest(hashes, self.evicted_blocks) * BLOCK

    def _note_evicted(self, e: Entry) -> None:
        for h in e.blocks:
            self.evicted_blocks[h] = None
            self.evicted_blocks.move_to_end(h)
        while len(self.evicted_blocks) > EVICTED_BLOCKS:
            self.evicted_blocks.popitem(last=False)

    def _hit(self, tokens, cache, n: int, tier: Optional[str]):
        self.counters["queries"] += 1
        self.counters["query_tokens"] += len(tokens)
        if cache is None:
            self.counters["misses"] += 1
            return None, 0, None
        self.counters["hits"] += 1
        self.counters["hit_tokens"] += n
        self.counters[f"{tier}_hit_tokens"] += n
        return cache, n, tier

    def _best(self, arr: np.ndarray, hashes: list[str], limit: int, ns: str) -> tuple[Optional[Entry], int, Optional[str]]:
        """The usable entry sharing the longest prefix (an untrimmable one only whole), and the
        longest prefix any entry shares with the request and that entry's key (for the reason
        when they differ). Deeper entries are looked at first; a checkpoint of a shorter
        prefix is found when the deeper ones cannot serve."""
        best, best_n, shared, nearest = None, 0, 0, None
        for depth, entries in self._candidates(hashes, ns):
            if best is not None and best_n >= depth + BLOCK - 1:
                break      # nothing further shares as much
            for e in entries:
                n = self._disk_prefix(e, arr, hashes, ns) if e.tokens is None else common_prefix(e.tokens, arr)
                n = min(n, limit)
                if n > shared:
                    shared, nearest = n, e.key
                usable = self._usable(e, n)
                if usable and (n > best_n or (n == best_n and best is not None and best.mem is None)):
                    best, best_n = e, n
        return best, shared, nearest

    def _disk_prefix(self, e: Entry, arr: np.ndarray, hashes: list[str], ns: str) -> int:
        """How much of `arr` an entry known only from disk shares, as far as its record tells:
        its whole length when every block agrees and its key (the hash of all its tokens)
        matches, since an untrimmable entry is usable only whole; else its block depth, a
        lower bound until it is loaded."""
        depth = min(self._block_depth(e, hashes), e.n_tokens)
        if depth == len(e.blocks) * BLOCK and e.n_tokens <= len(arr) and _key(arr[:e.n_tokens], ns) == e.key:
            return e.n_tokens
        return depth

    def _block_depth(self, e: Entry, hashes: list[str]) -> int:
        """How many of `e`'s blocks the prompt (its chained block hashes) shares."""
        depth = 0
        for mine, theirs in zip(hashes, e.blocks):
            if mine != theirs:
                break
            depth += 1
        return depth * BLOCK

    def _read(self, e: Entry, wait: bool):
        """The entry's (tokens, cache) from disk, or None; a Future while it is still being read."""
        if self.disk is None:
            return None
        fut = self.reads.get(e.key)
        if fut is None:
            if wait:
                return self.disk.load(e.key)
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefix-cache-loader")
            fut = self.reads[e.key] = self._loader.submit(self.disk.load, e.key)
            fut.key = e.key
            return fut
        if not fut.done() and not wait:
            return fut
        del self.reads[e.key]
        try:
            return fut.result()
        except Exception as exc:     # the loader's own failure: the entry is not served
            log.warning("reading prefix cache entry %s failed: %s", e.key, exc)
            return None

    def abandon(self, fut: Future) -> None:
        """Nobody waits for this read any more: drop it (and the arrays it holds)."""
        if self.reads.get(fut.key) is fut:
            del self.reads[fut.key]
            fut.cancel()

    def _install(self, e: Entry, tokens: np.ndarray, cache: list) -> None:
        """A disk read joins the memory tier when it fits."""
        e.tokens = tokens
        e.mem = self.pool.split(cache, e.n_tokens, e.blocks)
        e.nbytes = self.pool.logical_bytes(e.mem)
        self._remember(e)

    @property
    def memory_bytes(self) -> int:
        """Unique bytes in memory: every block once, plus the entries' own tails and states."""
        return self.pool.nbytes + self._own_bytes

    def _restore(self, e: Entry, n: int) -> list:
        """A fresh cache of the first `n` tokens of memory entry `e`: its blocks and tail
        assembled per plain layer, its other layers copied and cut (within `trim_room`)."""
        cache = self.pool.assemble(e.mem, n)
        if n < e.n_tokens:
            trim([c for c, plain in zip(cache, e.mem.layout.plain) if not plain], e.n_tokens - n)
        return cache

    @staticmethod
    def _cut(cache: list, e: Entry, n: int) -> list:
        """A cache just read from disk (nobody else holds it), cut to its first `n` tokens."""
        if n < e.n_tokens:
            trim(cache, e.n_tokens - n)
        return cache

    # -- store ------------------------------------------------------------------------

    def store(self, tokens: list[int], cache: list, ns: str = "") -> Optional[str]:
        """Keep the KV of a finished request (prompt + completion) for the next turn of its
        namespace `ns`; its key."""
        if not tokens or not cache:
            return None
        arr = np.asarray(tokens, dtype=np.int32)
        key = _key(arr, ns)
        old = self.entries.get(key)
        if old is not None and old.mem is not None:
            self.memory.move_to_end(key)
            return key
        trimmable = can_trim_prompt_cache(cache)
        if not trimmable:
            cache = compact(cache)
        room = 0 if trimmable else trim_room(cache)
        if self.kv_bits:
            cache = quantize(cache, self.kv_bits)
        mx.eval([c.state for c in cache])
        blocks = block_hashes(arr, ns=ns)
        # Split first: its blocks are held before the entries it covers let go of theirs.
        mem = self.pool.split(cache, len(arr), blocks)
        e = Entry(key=key, tokens=arr, n_tokens=len(arr), blocks=blocks, trimmable=trimmable,
                  room=room, mem=mem, nbytes=self.pool.logical_bytes(mem), on_disk=old is not None and old.on_disk,
                  stage=self.stage, ns=ns)
        if old is not None:
            self._unindex(old)
        covered = self._covered(e) if trimmable and not self.follower else []   # a follower's go when rank 0's do
        superseded = [c.key for c in covered if c.on_disk]
        if self.disk is not None and not e.on_disk:
            # Marked before it joins memory: an entry too large for memory lives on disk only.
            e.on_disk = self.disk.write(key, arr, cache, {"blocks": e.blocks, "trimmable": trimmable, "room": room},
                                        supersedes=superseded)
        elif self.disk is not None and superseded:
            self.disk.supersede(superseded)          # e is durable already
        for c in covered:
            if c.on_disk and not e.on_disk:
                self._evict_memory(c)    # e will not be written: the disk copies of earlier turns stay
            else:
                self._forget(c)
        self._index(e)
        self._remember(e)
        self.counters["stores"] += 1
        return key

    def _covered(self, e: Entry) -> list[Entry]:
        """Entries that are strict prefixes of `e`: an entry whose last full block is one of
        e's blocks shares all of e's tokens up to there; its key settles the partial tail.
        Entries under one block have no block to be found by; those in memory are looked at."""
        def prefix_of_e(c: Entry) -> bool:
            return c.n_tokens < e.n_tokens and c.key == _key(e.tokens[:c.n_tokens], e.ns)

        out = [c for c in self.memory.values() if not c.blocks and prefix_of_e(c)]
        for depth, h in enumerate(e.blocks, start=1):
            out += [self.entries[k] for k in self.by_block.get(h, ())
                    if len(self.entries[k].blocks) == depth and prefix_of_e(self.entries[k])]
        return out

    def _forget(self, e: Entry) -> None:
        self._evict_memory(e)
        self._unindex(e)

    def _remember(self, e: Entry) -> None:
        if e.key in self.memory:
            self.memory.move_to_end(e.key)
            return
        if e.nbytes > self.memory_budget:
            self.counters["too_large_for_memory"] += 1
            self._evict_memory(e)      # on disk only, or (no disk) not kept at all
            return
        self.memory[e.key] = e
        self._own_bytes += e.mem.own_bytes
        # The running bytes are those of the last step, which may still count the request that
        # just finished and is being stored here: the engine's next `fit_running` settles them.
        self._fit(self.memory_budget, keep=e)

    def fit_running(self, running_bytes: int) -> None:
        """What the running requests hold counts against the memory budget, as mlx-lm's
        `LRUPromptCache.trim_to(total - active)` does: stored entries go, oldest first, until
        stored + running <= budget, so a long batch never pushes the process past it."""
        self.running_bytes = running_bytes
        self._fit(self.memory_budget - running_bytes)

    def _fit(self, budget: int, keep: Optional[Entry] = None) -> None:
        """Evict the least recently used memory entries until the unique bytes fit `budget`;
        an entry's blocks go only with the last entry holding them (`BlockPool`)."""
        if self.memory_bytes <= budget:
            return      # the common case, on every engine step: no copy of the LRU list
        for old in list(self.memory.values()):      # oldest first
            if self.memory_bytes <= budget:
                break
            if old is keep:
                continue
            # A follower too: its memory is bounded by its own budget. An entry it drops that
            # rank 0 still holds fails rank 0's `has` round, so the request prefills instead.
            if not old.on_disk:
                self._note_evicted(old)
            self._evict_memory(old)
            self.counters["memory_evictions"] += 1

    def _evict_memory(self, e: Entry) -> None:
        if self.memory.pop(e.key, None) is not None:
            self._own_bytes -= e.mem.own_bytes
        if e.mem is not None:
            self.pool.release(e.mem)
        e.mem, e.nbytes = None, 0
        if not e.on_disk:
            self._unindex(e)
        elif self.disk is not None:
            e.tokens = None     # the disk copy has them; keep the index small

    def discard(self, key: str) -> None:
        """Drop an entry from both tiers (a batch that failed with it is not trusted to reuse it)."""
        e = self.entries.get(key)
        if e is None:
            return
        self._forget(e)
        if e.on_disk and self.disk is not None:
            self.disk.supersede([key])

    # -- by key: the followers of a pipeline group ----------------------------------------

    def has_key(self, key: str, n_tokens: Optional[int] = None) -> bool:
        """Whether this rank holds entry `key`, in memory or written (or queued) on disk, and
        can serve its first `n_tokens` (a rank whose layers keep a rotating window past its
        size cannot trim, even where rank 0's plain KV can). Cheap."""
        e = self.entries.get(key)
        if e is None or (n_tokens is not None and not self._serves(e, n_tokens)):
            return False
        return e.mem is not None or (e.on_disk and self.disk is not None and self.disk.has(key))

    @staticmethod
    def _usable(e: Entry, n: int) -> bool:
        """Whether entry `e` can serve its first `n` tokens: whole, or cut exactly (`trim_room`)."""
        return 0 < n <= e.n_tokens and (n == e.n_tokens or e.trimmable or e.n_tokens - n <= e.room)

    _serves = _usable

    def fetch_key(self, key: str, n_tokens: int) -> Optional[list]:
        """A fresh cache of the first `n_tokens` of entry `key` (rank 0's hit), read from disk
        on this thread if need be; None when this rank cannot serve it (missing, corrupt, or a
        length an untrimmable cache cannot give)."""
        e = self.entries.get(key)
        if e is None or not self._serves(e, n_tokens):
            return None
        if e.mem is None:
            loaded = self._read(e, wait=True)
            if loaded is None or self.entries.get(key) is not e:
                self._unindex(e)
                return None
            self._install(e, *loaded)
            cache = self._restore(e, n_tokens) if e.mem is not None else self._cut(loaded[1], e, n_tokens)
        else:
            self.memory.move_to_end(key)
            cache = self._restore(e, n_tokens)
        if e.on_disk and self.disk is not None:
            self.disk.touch(key)
        return dequantize(cache) if self.kv_bits else cache

    def _sync_disk(self) -> None:
        """Forget what the disk budget evicted (on the writer thread) and is in memory no more."""
        if self.disk is None:
            return
        for key in self.disk.take_evicted():
            e = self.entries.get(key)
            if e is not None and e.on_disk:
                e.on_disk = False
                if e.mem is None:
                    self._note_evicted(e)
                    self._unindex(e)

    def evicted_keys(self) -> list[str]:
        """Rank 0 of a group: the keys it dropped (from both tiers) since the last call, for
        the followers to `discard`. Entries stored again since are not in it."""
        self._sync_disk()
        out = [k for k in dict.fromkeys(self._evicted) if k not in self.entries]
        self._evicted.clear()
        return out

    # -- admin ------------------------------------------------------------------------

    def clear(self) -> int:
        """Forget everything now; the disk files go on the writer thread (the engine never waits)."""
        n = len(self.entries)
        for fut in list(self.reads.values()):
            self.abandon(fut)
        self.entries.clear()
        self.by_block.clear()
        self.memory.clear()
        self.pool.clear()
        self._own_bytes = 0
        self._evicted.clear()              # the followers are told to clear, not to evict
        if self.disk is not None:
            self.disk.clear()
        return n

    def stats(self) -> dict:
        disk = self.disk.stats() if self.disk is not None else {"entries": 0, "bytes": 0}
        return {
            "memory": self._memory_stats(),
            "disk": {**disk, **_whole_entry_sharing(disk)},
            "entries": len(self.entries),
            "kv_bits": self.kv_bits,
            "stage": self.stage,
            **self.counters,
        }

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
        if self.disk is not None:
            self.disk.close()

    def _memory_stats(self) -> dict:
        """`bytes` is what the budget counts (unique: every block once); `logical_bytes` what the
        entries would take as whole snapshots; `running_bytes` what the running requests hold."""
        logical = sum(e.nbytes for e in self.memory.values())
        unique = self.memory_bytes
        return {"entries": len(self.memory), "bytes": unique, "budget": self.memory_budget,
                "running_bytes": self.running_bytes, "block_tokens": self.pool.block_tokens,
                "unique_blocks": len(self.pool), "unique_bytes": unique, "logical_bytes": logical,
                "sharing_ratio": round(logical / unique, 3) if unique else 1.0}


def _whole_entry_sharing(disk: dict) -> dict:
    """The whole-entry disk tier (`DiskTier`) shares nothing yet: every entry is its own file."""
    b = disk.get("bytes", 0)
    return {"unique_bytes": b, "logical_bytes": b, "sharing_ratio": 1.0}
