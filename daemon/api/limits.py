"""Token buckets for per-key rate limits: requests and tokens per minute.

A request is admitted while both of its key's buckets are above zero; its tokens are
charged when it finishes (they are unknown before), so a bucket may go negative and the
key then waits until it refills. Retry-After says when.

Keys are client addresses when there are no API keys, so the buckets are bounded: a full
bucket is the same as none and is dropped, and past `max_keys` the least recently used go.
"""

from __future__ import annotations

import time
from collections import OrderedDict
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

    def full(self) -> bool:
        self._refill()
        return self.level >= self.capacity


class RateLimiter:
    def __init__(self, requests_per_minute: Optional[int], tokens_per_minute: Optional[int],
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000):
        self.rpm, self.tpm, self.clock, self.max_keys = requests_per_minute, tokens_per_minute, clock, max_keys
        self.buckets: OrderedDict[str, tuple[Optional[TokenBucket], Optional[TokenBucket]]] = OrderedDict()

    def configure(self, requests_per_minute: Optional[int], tokens_per_minute: Optional[int]) -> None:
        """New limits (a config reload): every key starts afresh under them."""
        if (requests_per_minute, tokens_per_minute) != (self.rpm, self.tpm):
            self.rpm, self.tpm = requests_per_minute, tokens_per_minute
            self.buckets.clear()

    def _of(self, key: str):
        if key in self.buckets:
            self.buckets.move_to_end(key)
            return self.buckets[key]
        if len(self.buckets) >= self.max_keys:
            self._prune()
        self.buckets[key] = (TokenBucket(self.rpm, self.clock) if self.rpm else None,
                             TokenBucket(self.tpm, self.clock) if self.tpm else None)
        return self.buckets[key]

    def _prune(self) -> None:
        """Drop the full buckets; if that is not enough, the least recently used down to 90% of the cap."""
        for key in [k for k, bs in self.buckets.items() if all(b is None or b.full() for b in bs)]:
            del self.buckets[key]
        while len(self.buckets) >= self.max_keys * 0.9:
            self.buckets.popitem(last=False)

    def admit(self, key: str) -> float:
        """0 and one request taken, or the seconds to wait before retrying."""
        if not (self.rpm or self.tpm):
            return 0.0
        requests, tokens = self._of(key)
        wait = max(requests.wait_time(1) if requests else 0.0, tokens.wait_time(1e-9) if tokens else 0.0)
        if wait > 0:
            return wait
        if requests:
            requests.take(1)
        return 0.0

    def charge(self, key: str, n_tokens: int) -> None:
        if self.tpm:
            tokens = self._of(key)[1]
            if tokens:
                tokens.take(n_tokens)
