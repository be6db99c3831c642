"""Operations on mlx-lm cache lists through their public state: quantize for storage, dequantize
for a batch, and cut exactly (plain KV any length; a wrapped window what it holds beyond what a
next token attends to), sizes."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache


def quantize(cache: list, bits: int) -> list:
    return [c.to_quantized(group_size=64, bits=bits) if isinstance(c, KVCache) else c for c in cache]


def dequantize(cache: list) -> list:
    """Quantized KV cannot join a batch (no merge), so it is restored on the way in."""
    out = []
    for c in cache:
        if isinstance(c, QuantizedKVCache) and c.keys is not None:
            kv = KVCache()
            kv.keys = mx.dequantize(*c.keys, group_size=c.group_size, bits=c.bits)[..., :c.offset, :]
            kv.values = mx.dequantize(*c.values, group_size=c.group_size, bits=c.bits)[..., :c.offset, :]
            kv.offset = c.offset
            out.append(kv)
        else:
            out.append(c)
    return out


def trim_room(cache: list) -> int:
    """How many tokens off its end `cache` can give back exactly: any number for plain KV (and
    a window that has not wrapped), none for recurrent state, and for a wrapped window what it
    holds beyond the window's last W-1 tokens, plus one (see `_trim_wrapped`)."""
    return min((_layer_room(c) for c in cache), default=0)


def _layer_room(c) -> int:
    if isinstance(c, RotatingKVCache):
        keys, _, offset, keep, max_size, _ = c.state
        if offset < max_size:
            return offset
        return 0 if keep or keys is None else max(0, keys.shape[2] - max_size + 1)
    return c.offset if c.is_trimmable() else 0


def trim(cache: list, n: int) -> None:
    """Cut the last `n` tokens off every layer (n within `trim_room`)."""
    for c in cache:
        if isinstance(c, RotatingKVCache) and not c.is_trimmable():
            _trim_wrapped(c, n)
        else:
            c.trim(n)


def compact(cache: list) -> list:
    """A wrapped window taken mid-prefill holds up to a prefill chunk more than its window
    (RotatingKVCache keeps W + S - 1 through a chunk of S): a checkpoint keeps the last W,
    which is all a next token reads, so it costs its window and not up to twice that."""
    for c in cache:
        if isinstance(c, RotatingKVCache) and not c.is_trimmable() and not c.keep and c.keys is not None \
                and c.keys.shape[2] > c.max_size:
            _trim_wrapped(c, 0)
            keys, values, offset, keep, max_size, _ = c.state
            c.state = (mx.contiguous(keys[..., -max_size:, :]), mx.contiguous(values[..., -max_size:, :]),
                       offset, keep, max_size, max_size)
    return cache


def _trim_wrapped(c: RotatingKVCache, n: int) -> None:
    """A wrapped window of W holds W tokens once a decode step has run, one more than a next
    token attends to (it overwrites the oldest before attending; a prefill chunk drops it
    first), so it can give back one token exactly, and a window filled by a prefill chunk
    holds that many more. The buffer is rebuilt in time order from the public state, with the
    slot of the oldest token, which nothing reads, kept so that the window stays full
    (BatchRotatingKVCache.merge takes a wrapped cache's last W entries)."""
    keys, values, offset, keep, max_size, idx = c.state
    length = keys.shape[2]
    if idx != length:       # in time order: the oldest at idx, as RotatingKVCache rotates (keep is 0)
        keys = mx.concatenate([keys[..., idx:, :], keys[..., :idx, :]], axis=2) if idx < offset else keys[..., :idx, :]
        values = (mx.concatenate([values[..., idx:, :], values[..., :idx, :]], axis=2) if idx < offset
                  else values[..., :idx, :])
    rest = keys.shape[2] - n
    keys, values = keys[..., :rest, :], values[..., :rest, :]
    if rest < max_size:
        pad = max_size - rest
        keys = mx.concatenate([mx.zeros_like(keys[..., :pad, :]), keys], axis=2)
        values = mx.concatenate([mx.zeros_like(values[..., :pad, :]), values], axis=2)
    c.state = (keys, values, offset - n, keep, max_size, keys.shape[2])


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)
