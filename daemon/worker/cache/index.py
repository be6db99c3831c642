"""The lookup index of the prefix cache: namespaces, chained block hashes, entry keys, and
the records of entries and of lookups (`Entry`, `Outcome`).

Block i's hash covers tokens [0, (i+1)*BLOCK) and is seeded by the namespace, so the deepest
hash a request shares with an entry bounds their common prefix from below (as in vLLM); the
exact common prefix is then measured on the tokens themselves. The empty namespace hashes
exactly as before namespaces existed, so existing disk entries stay valid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx_lm
import numpy as np

from ...events import CACHE_MISS_REASONS as REASONS  # noqa: F401  (Outcome.reason is one of them)

BLOCK = 32
FORMAT_VERSION = 1


def namespace(fingerprint: str, kv_bits: Optional[int], stage=None) -> str:
    """The disk directory of a model's entries: its weights, the numerics that computed the KV
    (mlx and mlx-lm versions: an upgrade may change them), the entry format, and in a pipeline
    group the rank's stage (its layers)."""
    ns = f"{fingerprint[:32]}-mlx{mx.__version__}-lm{mlx_lm.__version__}-kv{kv_bits or 'f'}-v{FORMAT_VERSION}"
    return f"{ns}-{stage.tag}" if stage is not None else ns


def _seed(ns: str) -> bytes:
    return hashlib.blake2b(ns.encode(), digest_size=12, person=b"mlxd-cache-ns").digest() if ns else b""


def block_hashes(tokens, n_blocks: Optional[int] = None, ns: str = "") -> list[str]:
    """Chained hashes of the full blocks of `tokens` (a hash commits to all before it, and
    to the namespace)."""
    arr = np.asarray(tokens, dtype=np.int64)
    n = len(arr) // BLOCK if n_blocks is None else min(n_blocks, len(arr) // BLOCK)
    out, prev = [], _seed(ns)
    for i in range(n):
        prev = hashlib.blake2b(prev + arr[i * BLOCK:(i + 1) * BLOCK].tobytes(), digest_size=12).digest()
        out.append(prev.hex())
    return out


def _key(tokens: np.ndarray, ns: str = "") -> str:
    """An entry's name: a hash of its namespace and its whole int32 token sequence."""
    return hashlib.blake2b(_seed(ns) + tokens.tobytes(), digest_size=16).hexdigest()


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n

@dataclass
class Outcome:
    """What the prefix cache did for one request, for the person asking why a turn was slow."""
    tokens: int = 0                  # prompt tokens served
    tier: Optional[str] = None       # memory or disk
    entry: Optional[str] = None      # the key served from
    shared: int = 0                  # the longest prefix any entry the cache knows shares with the prompt
    nearest: Optional[str] = None    # that entry
    reason: Optional[str] = None     # one of REASONS when tokens < shared, or nothing was found
    detail: str = ""

    def wire(self) -> dict:
        return {"tokens": self.tokens, "tier": self.tier, "entry": self.entry, "shared": self.shared,
                "nearest": self.nearest, "reason": self.reason, "detail": self.detail}


@dataclass
class Entry:
    key: str                       # hash of the full token sequence
    tokens: Optional[np.ndarray]   # None until loaded for an entry known only from disk
    n_tokens: int
    blocks: list[str]
    trimmable: bool
    room: int = 0                  # tokens it can give back exactly when not trimmable (a wrapped window: 1)
    cache: Optional[list] = None   # in memory when not None
    nbytes: int = 0
    on_disk: bool = False
    stage: Optional[str] = None    # the layers it holds, in a pipeline group (Stage.tag)
    ns: Optional[str] = None       # its namespace; None: not known (indexed from disk, not yet read)
