"""A model served by a pipeline-parallel group: rank 0 decides, every rank runs the same batch.

Each rank holds only its layers (`load_stage`) and its own `BatchGenerator`; a decode step is
one pipelined forward pass through all of them, so every rank must insert and remove the same
sequences in the same order before each `next()`. Rank 0 (the model's worker, the only one
that talks to the daemon) tokenizes, resolves the prefix cache and records every change it
makes to its batch as an operation; before each step it broadcasts them (a JSON list sealed
with the group's secret, `transport.py`; `all_sum` as mlx_lm.server's `_share_object`) and
the followers check and apply them:

    insert(uid, tokens, cached length, cache key, max_tokens, sampler args, grammar)
    remove(uid, keep cache)   store(uid, ns)   evict(keys)   clear   has(key)   memory
    step   shutdown

Samplers are rebuilt from their arguments on every rank (an unseeded sampled request gets a
seed from rank 0), and every rank computes the same logits, so they sample the same tokens.

A rank waiting in a collective spins a core, so nobody waits in one while idle: before each
broadcast rank 0 writes a byte to each follower's doorbell (a TCP connection to rank 0), and
a follower sleeps in `recv` on it. The doorbell also carries each follower's load result
(a JSON line) and tells a follower that rank 0 is gone (EOF), so it exits. Every doorbell
connection and the ring itself prove the group's secret first (`transport.py`).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from typing import Optional

import mlx.core as mx

from ..ranks import is_local
from .engine import Engine
from .grammar import Compiler, GrammarProcessor, reasoning_end
from .sampling import make_sampler
from .transport import Opener, Sealer, TransportError, follower_handshake, leader_handshake, ring_tag

log = logging.getLogger("mlxd.group")

CONNECT_TIMEOUT = 600.0     # a follower's load may take this long before rank 0 hears from it


class GroupFailed(BaseException):
    """A rank or the connection between ranks failed: the group must restart as a whole.
    A BaseException so that no per-request guard (which fails one request and goes on) catches it."""


# -- the broadcast ---------------------------------------------------------------------------


def share(data: bytes = b"") -> bytes:
    """Rank 0 sends `data`, the others receive it: mlx_lm.server's scheme, on sealed bytes."""
    if mx.distributed.init().rank() == 0:
        arr = mx.array(memoryview(data), dtype=mx.uint8)
        mx.eval(mx.distributed.all_sum(arr.size))
        mx.eval(mx.distributed.all_sum(arr))
        return data
    size = mx.distributed.all_sum(0).item()
    return bytes(memoryview(mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8))))


def verify_ring(secret: bytes) -> None:
    """Every rank shows its tag over the ring and checks everyone else's: a stranger who took a
    rank's place in the ring (its port, first) fails the group before any step is sent."""
    group = mx.distributed.init()
    n, me = group.size(), group.rank()
    table = mx.zeros((n, 32), dtype=mx.int32)
    table[me] = mx.array(list(ring_tag(secret, me, n)), dtype=mx.int32)
    got = mx.distributed.all_sum(table).tolist()
    for r, row in enumerate(got):
        if bytes(row) != ring_tag(secret, r, n):
            raise GroupFailed(f"rank {r} of the ring does not hold the group's secret; refusing to serve with it")


def all_true(flag: bool) -> bool:
    group = mx.distributed.init()
    return int(mx.distributed.all_sum(int(flag)).item()) == group.size()


def memory_table() -> list[tuple[int, int]]:
    """(active, peak) MLX memory of every rank, in rank order."""
    group = mx.distributed.init()
    mine = mx.zeros((group.size(), 2), dtype=mx.int64)
    mine[group.rank()] = mx.array([mx.get_active_memory(), mx.get_peak_memory()], dtype=mx.int64)
    return [tuple(row) for row in mx.distributed.all_sum(mine).tolist()]


def _addr(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class Bells:
    """Rank 0's doorbells: one connection per follower."""

    def __init__(self, endpoint: str, followers: int, secret: bytes):
        self.secret = secret
        host, port = _addr(endpoint)
        self.server = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.followers = followers
        self.socks: list[socket.socket] = []

    def gather(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Wait for every follower's load result; GroupFailed naming the rank that failed.
        A connection that does not prove the group's secret is closed and not counted."""
        deadline = time.monotonic() + timeout
        try:
            while len(self.socks) < self.followers:
                self.server.settimeout(max(deadline - time.monotonic(), 0.001))
                sock, peer = self.server.accept()
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    leader_handshake(sock, self.secret)
                except (TransportError, OSError) as e:
                    log.warning("doorbell: refused a connection from %s: %s", peer[0], e)
                    sock.close()
                    continue
                line = sock.makefile("rb").readline()
                sock.settimeout(None)
                self.socks.append(sock)
                msg = json.loads(line) if line else {"error": "closed its doorbell before loading"}
                if msg.get("error"):
                    raise GroupFailed(f"rank {msg.get('rank', '?')} failed to load: {msg['error']}")
        except socket.timeout:
            raise GroupFailed(f"{self.followers - len(self.socks)} rank(s) did not load within {timeout:.0f}s") from None
        finally:
            self.server.close()
        for s in self.socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ring(self) -> None:
        try:
            for s in self.socks:
                s.sendall(b"\x01")
        except OSError as e:
            raise GroupFailed(f"a rank of the group is gone ({e})") from None


class Bell:
    """A follower's doorbell: a blocking read that sleeps while rank 0 is idle."""

    def __init__(self, endpoint: str, rank: int, secret: bytes, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(_addr(endpoint), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            follower_handshake(self.sock, secret)   # rank 0 of this group, not whoever listens there
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self.rank = rank

    def report(self, error: Optional[str] = None) -> None:
        self.sock.sendall(json.dumps({"rank": self.rank, "error": error}).encode() + b"\n")

    def wait(self) -> bool:
        """Until rank 0 rings; False when it has gone."""
        try:
            return self.sock.recv(1) == b"\x01"
        except OSError:
            return False


# -- rank 0 ----------------------------------------------------------------------------------


class LeaderEngine(Engine):
    """The engine on rank 0: its `Batch` records every change (`record=True`), and the log goes
    out to the followers before each step."""

    def __init__(self, *args, bells: Bells, hosts: tuple[str, ...], **kw):
        super().__init__(*args, stream=mx.default_stream(mx.default_device()), record=True, **kw)
        self.bells = bells
        self.sealer = Sealer(bells.secret)
        self.hosts = hosts
        self.batch.before_step = self._send

    def _send(self, *extra: tuple) -> None:
        self._evicted()
        ops = [*self.batch.take_ops(), *extra]
        try:
            self.bells.ring()
            share(self.sealer.seal(ops))
        except GroupFailed:
            raise
        except Exception as e:
            raise GroupFailed(f"broadcasting to the group failed: {type(e).__name__}: {e}") from e

    def _evicted(self) -> None:
        pc = self.prefix_cache
        if pc is not None and (keys := pc.evicted_keys()):
            self.batch.log("evict", list(keys))

    def flush(self) -> None:
        """Send what is pending now (the group goes idle: followers store what finished)."""
        self._evicted()
        if self.batch.ops:
            self._send()

    def shutdown(self) -> None:
        self._send(("shutdown",))
        mx.eval(mx.distributed.all_sum(1))    # exit together: nobody's peer vanishes mid-collective

    def rank_memory(self) -> list[dict]:
        """Each rank's MLX memory (a round trip: the followers answer in one all_sum)."""
        self._send(("memory",))
        mem = memory_table()
        hosts = self.hosts
        return [{"rank": r, "host": hosts[r], "local": is_local(hosts[r]),
                 "memory_bytes": int(a), "peak_memory_bytes": int(p)} for r, (a, p) in enumerate(mem)]

    def sampling(self, msg: dict) -> tuple:
        temperature, top_p, seed, top_k = super().sampling(msg)
        if temperature > 0 and seed is None:
            seed = secrets.randbits(63)      # every rank must draw the same numbers
        return temperature, top_p, seed, top_k

    def shared(self, key: str, n_tokens: int) -> bool:
        self._send(("has", key, n_tokens))
        if all_true(self.prefix_cache.has_key(key, n_tokens)):
            return True
        log.warning("prefix cache entry %s is missing on a rank of the group; dropping it", key)
        self.prefix_cache.discard(key)       # the others drop theirs with the next round's evictions
        return False

    def reset(self, e: Exception) -> list[dict]:
        raise GroupFailed(f"the group's batch failed ({type(e).__name__}: {e})") from e


# -- ranks 1..n-1 ----------------------------------------------------------------------------


class Follower:
    """A rank without a daemon: replays rank 0's operation log through its own engine's `Batch`."""

    OPS = ("insert", "remove", "store", "checkpoint", "evict", "clear", "memory", "has", "step")

    def __init__(self, engine: Engine, bell: Bell, secret: bytes):
        self.engine = engine
        self.bell = bell
        self.opener = Opener(secret)
        self.kept: dict[int, tuple] = {}     # uid -> (cache, tokens) of sequences that just left the batch
        self.checkpoints: dict[tuple, tuple] = {}   # (uid, n_tokens) -> (cache, tokens) passed in the last step
        self.store_errors = 0

    def run(self) -> None:
        while self.bell.wait():
            try:
                ops = self.opener.open(share())
            except TransportError as e:
                raise GroupFailed(f"rank {self.bell.rank} refused a step broadcast: {e}") from None
            for op in ops:
                if op[0] == "shutdown":
                    mx.eval(mx.distributed.all_sum(1))
                    return
                if op[0] not in self.OPS:
                    raise GroupFailed(f"rank {self.bell.rank} got an unknown operation {op[0]!r}")
                getattr(self, "_" + op[0])(*op[1:])
        log.error("rank 0 of the group is gone; exiting")

    def _insert(self, uid, tokens, n_cached, key, max_tokens, spec, wanted, checkpoints=()) -> None:
        e = self.engine
        cache = None
        if key is not None:
            cache = e.prefix_cache.fetch_key(key, n_cached)
            if cache is None:
                raise GroupFailed(f"prefix cache entry {key} vanished on rank {self.bell.rank}")
        proc = None
        if wanted is not None:
            if e.compiler is None:
                e.compiler = Compiler(e.tokenizer, e._vocab_size())
            proc = GrammarProcessor(e.compiler.compile(*wanted).result(), e._vocab_size(), e.tokenizer.eos_token_id,
                                    reasoning_end(e.tokenizer, tokens) if e.think else None)
        mine = e.batch.insert(tokens, n_cached=n_cached, cache=cache, max_tokens=max_tokens,
                              sampler=make_sampler(*spec), processor=proc, checkpoints=checkpoints)
        if mine != uid:
            raise GroupFailed(f"rank {self.bell.rank} is out of step (uid {mine}, rank 0 has {uid})")

    def _remove(self, uid, caches) -> None:
        got = self.engine.batch.remove(uid, caches)
        if got:
            self.kept[uid] = got

    def _store(self, uid, ns="") -> None:
        """Best effort, as on rank 0: a failure costs this entry's reuse (rank 0's `has` check
        finds the shard missing), never the rank."""
        got = self.kept.pop(uid, None)
        if got is not None and got[0] and got[1]:
            pc = self.engine.prefix_cache
            try:
                pc.store(list(got[1]), got[0], ns)     # the same key as rank 0's
            except Exception:
                self.store_errors += 1
                pc.counters["store_errors"] += 1
                log.exception("rank %d: storing a finished request's cache failed; serving goes on", self.bell.rank)

    def _checkpoint(self, uid, n_tokens, ns="") -> None:
        got = self.checkpoints.pop((uid, n_tokens), None)
        if got is not None:
            try:
                self.engine.prefix_cache.store(got[1], got[0], ns)
            except Exception:
                self.store_errors += 1
                self.engine.prefix_cache.counters["store_errors"] += 1
                log.exception("rank %d: storing a checkpoint failed; serving goes on", self.bell.rank)

    def _evict(self, keys) -> None:
        for k in keys:
            self.engine.prefix_cache.discard(k)

    def _clear(self) -> None:
        self.engine.prefix_cache.clear()

    def _memory(self) -> None:
        memory_table()

    def _has(self, key, n_tokens) -> None:
        all_true(self.engine.prefix_cache.has_key(key, n_tokens))

    def _step(self) -> None:
        self.kept.clear()            # rank 0 stored what it wanted before this step
        self.checkpoints.clear()
        _, responses, checkpoints = self.engine.batch.step()
        for c in checkpoints:
            self.checkpoints[(c.uid, len(c.tokens))] = (c.cache, c.tokens)
        for r in responses:
            if r.finish_reason is not None:
                self.kept[r.uid] = (r.prompt_cache, r.all_tokens)
