"""Per-request samplers that do not make the batch drain.

mlx-lm's BatchGenerator takes one sampler per sequence and batches the call when they are
the same object, so every greedy request shares `greedy_sampler`. A seeded request carries
its own PRNG key, so its output does not depend on what else is in the batch. Speculative
decoding needs the distribution a sampler draws from, not only a draw, so `Sampler` exposes
`process` (the log-probs after top_k, top_p and temperature) and its random numbers.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler


class Sampler:
    def __init__(self, temperature: float, top_p: float, seed: Optional[int], top_k: int = 0):
        self.inv_temp, self.top_p, self.top_k = 1.0 / temperature, top_p, top_k
        self.key = mx.random.key(seed & (2**64 - 1)) if seed is not None else None   # a negative int64 too

    def process(self, logprobs: mx.array) -> mx.array:
        """Unnormalised log-probs of what `__call__` draws from (last axis: the vocabulary)."""
        if 0 < self.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, self.top_k)
        if 0.0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        return logprobs * self.inv_temp

    def _subkey(self) -> Optional[mx.array]:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def categorical(self, logits: mx.array) -> mx.array:
        return mx.random.categorical(logits, key=self._subkey())

    def uniform(self, n: int) -> mx.array:
        return mx.random.uniform(shape=(n,), key=self._subkey())

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.categorical(self.process(logprobs))


def make_sampler(temperature: float, top_p: float, seed: Optional[int], top_k: int = 0):
    if temperature <= 0.0:
        return greedy_sampler
    return Sampler(temperature, top_p, seed, top_k)
