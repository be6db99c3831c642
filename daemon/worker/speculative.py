"""Prompt-lookup speculative decoding: drafts copied from a request's own tokens, verified for
every sequence of a batch in one forward pass.

A draft is what followed the most recent earlier occurrence of the sequence's last n tokens
(n from ngram's max down to its min) in its prompt and output; no match, no draft, no cost.
Each step feeds every row its pending tokens (decided but not yet in the KV cache: at least
the last one) plus its draft, right-padded to the step's longest row, and keeps the longest
prefix of the draft the model agrees with, plus the model's own next token. Greedy rows accept
while argmax agrees; sampled rows use the rejection rule for a deterministic draft (accept d
with probability p(d), else draw from p without d), so the output distribution is unchanged.

Rollback uses BatchKVCache's public API only. A trim removes the same number of entries from
every row, so the batch trims to its shortest row's accepted length and the other rows' extra
accepted tokens stay pending, re-fed (recomputed) next step: cheap, since a verify pass of a
few more tokens costs little more than one. When a row runs too far ahead, the rows are rolled
(`prepare(right_padding=...)` + `finalize()`), which copies the cache, so it is the exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache
from numpy.lib.stride_tricks import sliding_window_view

COMPACT = 64     # left padding every row has gathered (from rolls) before the cache is compacted


def find_draft(tokens: list[int], ngram: tuple[int, int], max_draft: int) -> list[int]:
    """What followed the earlier occurrence of the sequence's tail that matches it longest
    (at least ngram[0] tokens, counted up to ngram[1]; the most recent among equals)."""
    lo, hi = ngram
    if max_draft < 1 or len(tokens) < lo + 1:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    ends = np.flatnonzero((sliding_window_view(seq[:-1], lo) == seq[-lo:]).all(axis=1)) + lo - 1
    if not ends.size:
        return []
    length = np.full(ends.shape, lo)
    for k in range(lo, hi):     # extend every match backwards while it still agrees
        alive = (length == k) & (ends - k >= 0)
        alive[alive] = seq[ends[alive] - k] == seq[-1 - k]
        if not alive.any():
            break
        length[alive] += 1
    end = ends[np.flatnonzero(length == length.max())[-1]] + 1
    return seq[end:end + max_draft].tolist()


@dataclass
class Emitted:
    """One token a step decided; `logprobs` (the whole vocabulary's) is lazy, only computed if read."""
    token: int
    logprobs: Optional[mx.array]


@dataclass
class Row:
    uid: int
    sampler: Any                 # None: greedy
    context: list[int]           # every token of the sequence: in the cache, then pending
    pending: list[int]           # decided, not yet in the cache (the last token at least)
    remaining: int               # tokens it may still emit
    logprobs: bool
    limit: int                   # adaptive draft length
    emitted: list[Emitted] = field(default_factory=list)


class SpecBatch:
    """The rows decoding speculatively, and their batched KV cache."""

    def __init__(self, model, *, max_draft: int, ngram: tuple[int, int], max_sequences: int = 1):
        self.model = model
        self.max_draft, self.ngram = max_draft, tuple(ngram)
        self.pending_cap = max_draft
        # Beyond this many rows nobody drafts: a batch already fills the CPU, so a wider verify
        # pass costs more than its accepted tokens save (measured in the README).
        self.max_sequences = max_sequences
        self.rows: list[Row] = []
        self.cache: Optional[list] = None
        self.draft_tokens = 0
        self.accepted_tokens = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, uid: int) -> bool:
        return any(r.uid == uid for r in self.rows)

    def add(self, uid: int, cache: list, tokens: list[int], *, sampler, max_tokens: int, logprobs: bool) -> None:
        """A sequence whose KV cache holds all of `tokens` but the last (trimmed by the caller)."""
        single = [BatchKVCache.merge([c]) for c in cache]
        if self.cache is None:
            self.cache = single
        else:
            for c, s in zip(self.cache, single):
                c.extend(s)
        self.rows.append(Row(uid, sampler, list(tokens), [tokens[-1]], max_tokens, logprobs, self.max_draft))

    def remove(self, uid: int, keep: Optional[int] = None) -> tuple[list, list[int]]:
        """Take a row out: its own KV cache and the tokens it holds. With `keep`, exactly the
        sequence up to its `keep`-th token emitted by the last step (trimmed, or the pending
        ones fed), as the cache of a sequence that stopped there would be."""
        i = next(i for i, r in enumerate(self.rows) if r.uid == uid)
        row = self.rows.pop(i)
        cache = [c.extract(i) for c in self.cache]
        if self.rows:
            for c in self.cache:
                c.filter([j for j in range(len(self.rows) + 1) if j != i])
        else:
            self.cache = None
        n_cached = len(row.context) - len(row.pending)
        want = n_cached if keep is None else len(row.context) - len(row.emitted) + keep
        if want < n_cached:
            for c in cache:
                c.trim(n_cached - want)
        elif want > n_cached:
            self.model(mx.array([row.context[n_cached:want]]), cache=cache)
        for c in cache:     # exactly its tokens, as BatchGenerator's caches are (files, memory budget)
            keys, values, offset = c.state
            if keys is not None and keys.shape[2] > offset:
                c.state = (keys[..., :offset, :], values[..., :offset, :], offset)
        mx.eval([c.state for c in cache])
        return cache, row.context[:want]

    def step(self) -> dict[int, list[Emitted]]:
        """One verify pass for every row: the tokens each row emits, in order."""
        rows = self.rows
        drafting = len(rows) <= self.max_sequences
        drafts = [self._draft(r) if drafting else [] for r in rows]
        inputs = [r.pending + d for r, d in zip(rows, drafts)]
        width = max(map(len, inputs))
        x = mx.array([i + [0] * (width - len(i)) for i in inputs])
        logits = self.model(x, cache=self.cache)
        best = mx.argmax(logits, axis=-1)
        sampled = {i: self._sample(r, logits[i], len(r.pending), d)
                   for i, (r, d) in enumerate(zip(rows, drafts)) if r.sampler is not None}
        mx.eval(best, *sampled.values())
        best = best.tolist()
        logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)) if any(r.logprobs for r in rows) else None

        valid = []
        for i, (r, d) in enumerate(zip(rows, drafts)):
            p = len(r.pending)
            if r.sampler is None:
                guess, a = best[i][p - 1:p + len(d)], 0
                while a < len(d) and guess[a] == d[a]:
                    a += 1
                out = d[:a] + [guess[a]]
            else:
                out = self._accept(sampled[i].tolist(), d)
                a = len(out) - 1
            r.emitted = [Emitted(t, logprobs[i, p - 1 + j] if logprobs is not None else None) for j, t in enumerate(out)]
            r.context += out
            r.remaining -= len(out)
            self.draft_tokens += len(d)
            self.accepted_tokens += a
            if d:   # adapt: grow after a full accept, shrink to what was accepted after a miss
                r.limit = min(self.max_draft, r.limit * 2) if a == len(d) else max(1, a + 1)
            valid.append(p + a)
        self._commit(inputs, valid, width, self.pending_cap if drafting else 0)
        return {r.uid: r.emitted for r in rows}

    def _draft(self, r: Row) -> list[int]:
        room = min(r.limit, r.remaining - 1, self.pending_cap + 1 - len(r.pending))
        return find_draft(r.context, self.ngram, room) if room > 0 else []

    def _sample(self, r: Row, logits: mx.array, p: int, draft: list[int]) -> mx.array:
        """For a sampled row: [uniforms for the draft, probabilities of the draft tokens, the
        residual draw at each draft position, the draw after the draft], one array to eval."""
        k = len(draft)
        lp = logits[p - 1:p + k]
        probs = mx.softmax(r.sampler.process(lp - mx.logsumexp(lp, axis=-1, keepdims=True)), axis=-1)
        if not k:
            return r.sampler.categorical(mx.log(probs[-1:])).astype(mx.float32)
        d = mx.array(draft)
        p_draft = mx.take_along_axis(probs[:k], d[:, None], axis=-1)[:, 0]
        residual = mx.put_along_axis(probs[:k], d[:, None], mx.array(0.0, probs.dtype), axis=-1)
        return mx.concatenate([r.sampler.uniform(k), p_draft,
                               r.sampler.categorical(mx.log(residual)).astype(mx.float32),
                               r.sampler.categorical(mx.log(probs[k:])).astype(mx.float32)])

    @staticmethod
    def _accept(v: list[float], draft: list[int]) -> list[int]:
        k = len(draft)
        u, p_draft, residual, bonus = v[:k], v[k:2 * k], v[2 * k:3 * k], v[3 * k:]
        for j in range(k):
            if u[j] >= p_draft[j]:
                return draft[:j] + [int(residual[j])]
        return draft + [int(bonus[0])]

    def _commit(self, inputs: list[list[int]], valid: list[int], width: int, cap: int) -> None:
        """Keep each row's accepted inputs in the cache: one trim for all rows, the rest pending;
        a roll when some row would have more than `cap` pending (0: no drafts, so align now)."""
        low = min(valid)
        if max(valid) - low <= cap:
            for c in self.cache:
                c.trim(width - low)
            for r, inp, v in zip(self.rows, inputs, valid):
                r.pending = inp[low:v] + [r.context[-1]]
            return
        high = max(valid)
        for c in self.cache:
            c.trim(width - high)
            c.prepare(right_padding=[high - v for v in valid])
            c.finalize()
        for r in self.rows:
            r.pending = [r.context[-1]]
        pad = min(self.cache[0].left_padding.tolist())
        if pad >= COMPACT:
            for c in self.cache:
                c.filter(list(range(len(self.rows))))
