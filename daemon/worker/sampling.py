"""Per-request samplers that do not make the batch drain.

mlx-lm's BatchGenerator takes one sampler per sequence and batches the call when they are
the same object, so every greedy request shares `greedy_sampler`. A seeded request carries
its own PRNG key, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler


def make_sampler(temperature: float, top_p: float, seed: Optional[int], top_k: int = 0):
    if temperature <= 0.0:
        return greedy_sampler
    inv_temp = 1.0 / temperature
    key = mx.random.key(seed & (2**64 - 1)) if seed is not None else None   # a negative int64 too

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample
