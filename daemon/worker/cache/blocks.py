"""The storage block of the paged prefix cache: the format both tiers keep and exchange.

A block holds the KV of `n_tokens` consecutive tokens [start, start + n_tokens) of one
token sequence, for every trimmable plain-KV layer of the model (KVCache, or a
QuantizedKVCache under `kv_bits`), in layer order; untrimmable layers (rotating windows,
recurrent state) are never in a block: each entry keeps their state whole.

A block is addressed by the chained lookup hash at its end (`block_hashes(tokens, ns=ns)`
at index (start + n_tokens) // 32 - 1): that hash commits to every token before it and
to the namespace (weights, numerics, kv_bits, stage, tenant), so two sequences share a
block exactly when they share every token up to its end. `start` is a multiple of the
block size and `n_tokens` is the block size (`prefix_cache.block_tokens`, a multiple of
32): a partial block is never a Block, it is its entry's own tail.

`layers[i]` is the i-th trimmable layer's KV for those tokens:
- plain: `(keys, values)`, each shape (1, n_kv_heads, n_tokens, head_dim), cache dtype;
- quantized: `(k_data, k_scales, k_biases, v_data, v_scales, v_biases)`, the arrays of
  `mx.quantize(..., group_size=64, bits=kv_bits)` of keys and values (token axis 2).
The arrays are `mx.array` (contiguous, evaluated) or numpy arrays of the same shape and
dtype (as a disk store may hand them back); `as_mx` turns the latter into the former.
Nothing else is in a block, so it serializes as its arrays plus (hash, start, n_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class Block:
    hash: str          # chained lookup hash at the block's end (hex)
    start: int         # first token's index in the sequence
    n_tokens: int      # tokens it covers (the block size)
    layers: list[tuple] = field(default_factory=list)   # per trimmable layer, in layer order
    nbytes: int = 0    # sum of the arrays' bytes (computed when 0)

    def __post_init__(self):
        if not self.nbytes:
            self.nbytes = sum(int(a.nbytes) for layer in self.layers for a in layer)

    @property
    def end(self) -> int:
        return self.start + self.n_tokens

    def as_mx(self) -> "Block":
        """The same block with every array an mx.array (a disk read may give numpy)."""
        if all(isinstance(a, mx.array) for layer in self.layers for a in layer):
            return self
        return Block(self.hash, self.start, self.n_tokens,
                     [tuple(a if isinstance(a, mx.array) else mx.array(a) for a in layer) for layer in self.layers],
                     self.nbytes)
