"""Token buckets for per-key rate limits: requests and tokens per minute.

A request is admitted while both of its key's buckets are above zero; its tokens are
charged when it finishes (they are unknown before), so a bucket may go negative and the
key then waits until it refills. Retry-After says when.
"""

from __future__ import annotations

import time
from typing import Callable, Optional


class TokenBucket:
    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, need: float = 1.0) -> float:
        """Seconds until `need` can be taken (0 if now)."""
        self._refill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n


class RateLimiter:
    def __init__(self, requests_per_minute: Optional[int], tokens_per_minute: Optional[int],
                 clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.clock = requests_per_minute, tokens_per_minute, clock
        self.buckets: dict[str, tuple[Optional[TokenBucket], Optional[TokenBucket]]] = {}

    def _of(self, key: str):
        if key not in self.buckets:
            self.buckets[key] = (TokenBucket(self.rpm, self.clock) if self.rpm else None,
                                 TokenBucket(self.tpm, self.clock) if self.tpm else None)
        return self.buckets[key]

    def admit(self, key: str) -> float:
        """0 and one request taken, or the seconds to wait before retrying."""
        requests, tokens = self._of(key)
        wait = max(requests.wait_time(1) if requests else 0.0, tokens.wait_time(1e-9) if tokens else 0.0)
        if wait > 0:
            return wait
        if requests:
            requests.take(1)
        return 0.0

    def charge(self, key: str, n_tokens: int) -> None:
        tokens = self._of(key)[1]
        if tokens:
            tokens.take(n_tokens)
