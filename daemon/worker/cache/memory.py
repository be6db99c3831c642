"""The memory tier's storage: an entry's KV as shared blocks plus what is its own.

An entry in memory (`Stored`) is the chain of its full storage blocks (`blocks.Block`, of
`block_tokens` tokens, addressed by the chained lookup hash at their end), its own partial
tail (the KV of its last < block_tokens tokens of every plain-KV layer) and a whole copy of
every other layer (rotating window, recurrent state: what cannot be cut per block). Two
entries sharing a prefix share its blocks: the pool keeps each block once, reference
counted by the entries holding it, and frees it when the last one goes. So a checkpoint of
a hybrid model costs its recurrent/rotating state and its tail, not another copy of the
attention KV.

Restoring a hit is one concatenation per plain-KV layer (blocks + tail, cut at the hit
length) into fresh mlx-lm cache objects, and a copy of the other layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .blocks import Block
from .index import BLOCK


def is_plain(c) -> bool:
    """A layer whose KV can be cut per token and so shared per block (not a subclass: a
    chunked or rotating cache keeps more than its tokens' KV)."""
    return type(c) in (KVCache, QuantizedKVCache)


def _copy(x: mx.array) -> mx.array:
    """A fresh buffer: a slice may share its parent's, which would keep the whole parent alive."""
    return x + mx.zeros((), dtype=x.dtype)


def _layer_arrays(c) -> tuple:
    """A plain layer's KV buffers, flat: (keys, values) or the quantized six (token axis 2;
    they may run past `offset`, as allocated in steps)."""
    keys, values = c.keys, c.values
    if isinstance(c, QuantizedKVCache):
        return (*keys, *values)
    return keys, values


@dataclass
class Layout:
    """What each layer of an entry is: plain KV (with its quantization) or an own state."""
    plain: list[bool]
    quant: list[Optional[tuple[int, int]]]    # (group_size, bits) of a quantized plain layer


@dataclass
class Stored:
    """An entry's cache in memory: its block chain, its own tail and other layers."""
    layout: Layout
    blocks: list[str]                      # hashes of its full storage blocks, in order
    tail: list[tuple]                      # per plain layer: KV of tokens [len(blocks)*B, n)
    others: dict[int, object] = field(default_factory=dict)   # layer index -> its whole cache object
    own_bytes: int = 0                     # tail + others: what it does not share


class BlockPool:
    """Blocks kept once, reference counted by the entries (and reads) holding them."""

    def __init__(self, block_tokens: int):
        if block_tokens <= 0 or block_tokens % BLOCK:
            raise ValueError(f"prefix_cache.block_tokens must be a positive multiple of {BLOCK}, got {block_tokens}")
        self.block_tokens = block_tokens
        self.blocks: dict[str, Block] = {}
        self.refs: dict[str, int] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def has(self, h: str) -> bool:
        return h in self.blocks

    def add(self, block: Block) -> None:
        """Hold `block` once more; a block already kept is shared, not stored again."""
        if block.hash in self.blocks:
            self.refs[block.hash] += 1
            return
        self.blocks[block.hash] = block
        self.refs[block.hash] = 1
        self.nbytes += block.nbytes

    def incref(self, h: str) -> None:
        self.refs[h] += 1

    def decref(self, h: str) -> None:
        self.refs[h] -= 1
        if self.refs[h] <= 0:
            del self.refs[h]
            self.nbytes -= self.blocks.pop(h).nbytes

    def clear(self) -> None:
        self.blocks.clear()
        self.refs.clear()
        self.nbytes = 0

    # -- split and assemble ----------------------------------------------------------

    def split(self, cache: list, n_tokens: int, hashes: list[str]) -> Stored:
        """Keep `cache` (of `n_tokens` tokens; `hashes` its chained 32-token lookup hashes) as
        blocks shared with whatever is already kept, plus its own tail and other layers."""
        bt = self.block_tokens
        plain = [is_plain(c) for c in cache]
        quant = [(c.group_size, c.bits) if isinstance(c, QuantizedKVCache) else None for c in cache]
        kv = [_layer_arrays(c) for c, p in zip(cache, plain) if p]
        n_full = n_tokens // bt if kv else 0
        chain = []
        for b in range(n_full):
            h = hashes[(b + 1) * bt // BLOCK - 1]
            chain.append(h)
            if h in self.blocks:
                self.incref(h)
                continue
            s = slice(b * bt, (b + 1) * bt)
            layers = [tuple(_copy(a[..., s, :]) for a in arrs) for arrs in kv]
            mx.eval(layers)
            self.add(Block(h, b * bt, bt, layers))
        t = slice(n_full * bt, n_tokens)
        tail = [tuple(_copy(a[..., t, :]) for a in arrs) for arrs in kv]
        others = {i: c for i, (c, p) in enumerate(zip(cache, plain)) if not p}
        mx.eval(tail)
        own = sum(int(a.nbytes) for layer in tail for a in layer) + sum(c.nbytes for c in others.values())
        return Stored(Layout(plain, quant), chain, tail, others, own)

    def assemble(self, s: Stored, n: int) -> list:
        """Fresh mlx-lm caches of the first `n` tokens of `s` (the other layers whole, as kept:
        the caller cuts them where they can be cut)."""
        bt = self.block_tokens
        n_blocks = min(len(s.blocks), -(-n // bt))
        parts = [self.blocks[h].layers for h in s.blocks[:n_blocks]]
        use_tail = n > len(s.blocks) * bt
        out, j = [], 0
        for i, plain in enumerate(s.layout.plain):
            if not plain:
                out.append(copy.deepcopy(s.others[i]))
                continue
            pieces = [p[j] for p in parts] + ([s.tail[j]] if use_tail else [])
            arrs = [mx.concatenate([p[k] for p in pieces], axis=2)[..., :n, :] if len(pieces) > 1
                    else pieces[0][k][..., :n, :] for k in range(len(pieces[0]))]
            q = s.layout.quant[i]
            if q is None:
                c = KVCache()
                c.keys, c.values = arrs
            else:
                c = QuantizedKVCache(group_size=q[0], bits=q[1])
                c.keys, c.values = tuple(arrs[:3]), tuple(arrs[3:])
            c.offset = n
            out.append(c)
            j += 1
        return out

    def release(self, s: Stored) -> None:
        for h in s.blocks:
            self.decref(h)
        s.blocks = []

    def logical_bytes(self, s: Stored) -> int:
        """What the entry would take as a whole snapshot."""
        return s.own_bytes + sum(self.blocks[h].nbytes for h in s.blocks)
