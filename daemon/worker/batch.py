"""The only caller of mlx-lm's BatchGenerator: insert (with segments), remove, extract, step.

Everything that changes a model's batch goes through `Batch`, so that the distributed
group's ranks can run the same batch: with `record=True` (rank 0 of a group) every change
is also appended to `ops`, which the followers replay through their own `Batch` in order
(`group.py`). A prompt's checkpoint positions become the segments of its insert here and
nowhere else; at each one the step hands back the sequence's cache (`Checkpoint`), as
mlx_lm.server does at its segment ends, through `Response.end_of_segment` and
`extract_cache` (public API).

`Waiting` is the one record of a request that is not in the batch yet: its grammar
compiles, its cached prefix is read from disk, or it is held while the speculative batch
is full.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mlx_lm.generate import BatchGenerator


@dataclass
class Waiting:
    """A request not in the batch yet, with what its insert needs."""
    active: Any                         # the engine's record of the request
    tokens: list[int]
    sampler: Any
    spec: tuple = ()                    # make_sampler's arguments (a group's other ranks build the same)
    wanted: Optional[tuple] = None      # the grammar and its field, when constrained
    grammar: Optional[Future] = None    # the compiler's Future of the request's matcher
    read: Any = None                    # the prefix cache's Future for a disk read
    checkpoints: tuple = ()             # prompt positions to keep a cache at (see checkpoints.py)

    @property
    def why(self) -> str:
        return "grammar" if self.grammar is not None else "disk" if self.read is not None else "held"

    @property
    def waiting_on(self) -> Optional[Future]:
        return self.grammar if self.grammar is not None else self.read


@dataclass
class Checkpoint:
    """A sequence's cache at one of its checkpoint positions, taken as its prefill passed it."""
    uid: int
    tokens: list[int]
    cache: list


def segments(tokens: list[int], n_cached: int, checkpoints) -> list[list[int]]:
    """The uncached rest of a prompt cut at the checkpoint positions past `n_cached` (and
    before its last token, which BatchGenerator always feeds on its own)."""
    cuts = sorted({c for c in checkpoints if n_cached < c < len(tokens) - 1})
    out, start = [], n_cached
    for c in cuts:
        out.append(tokens[start:c])
        start = c
    out.append(tokens[start:])
    return out


@dataclass
class Batch:
    model: Any
    max_tokens: int
    stop_tokens: list
    completion_batch_size: int
    prefill_batch_size: int
    prefill_step_size: int
    stream: Any = None
    record: bool = False            # rank 0 of a group: keep `ops` for the followers
    ops: list = field(default_factory=list)
    wanted: dict = field(default_factory=dict)    # uid -> (prompt offset at insert, checkpoint positions)
    before_step: Optional[Callable[[], None]] = None   # rank 0 of a group: broadcast the log

    def __post_init__(self) -> None:
        self.gen = self._new()

    def _new(self) -> BatchGenerator:
        return BatchGenerator(
            self.model, max_tokens=self.max_tokens, stop_tokens=self.stop_tokens,
            completion_batch_size=self.completion_batch_size,
            prefill_batch_size=min(self.prefill_batch_size, self.completion_batch_size),
            prefill_step_size=self.prefill_step_size, stream=self.stream)

    def log(self, *op) -> None:
        """Record an operation for the followers (a no-op off rank 0 of a group)."""
        if self.record:
            self.ops.append(op)

    def take_ops(self) -> list:
        ops, self.ops = self.ops, []
        return ops

    def insert(self, tokens: list[int], *, n_cached: int, cache, max_tokens: int, sampler, processor=None,
               checkpoints=(), key: Optional[str] = None, spec: tuple = (), wanted=None) -> int:
        """Join the batch on top of `cache` (its first `n_cached` tokens); its uid. `key`,
        `spec` and `wanted` are what a follower needs to build the same insert."""
        extra = {"logits_processors": [[processor]]} if processor is not None else {}
        (uid,) = self.gen.insert_segments(
            [segments(tokens, n_cached, checkpoints)], max_tokens=[max_tokens], caches=[cache],
            all_tokens=[list(tokens[:n_cached])], samplers=[sampler], **extra)
        cuts = {c for c in checkpoints if n_cached < c < len(tokens) - 1}
        if cuts:
            self.wanted[uid] = (n_cached, cuts)
        self.log("insert", uid, tokens, n_cached, key, max_tokens, spec, wanted, tuple(sorted(cuts)))
        return uid

    def remove(self, uid: int, caches: bool = False):
        """Take a sequence out of the batch; its (cache, tokens) when asked for."""
        self.wanted.pop(uid, None)
        self.log("remove", uid, caches)
        if caches:
            return self.gen.remove([uid], return_prompt_caches=True).get(uid)
        self.gen.remove([uid])
        return None

    def step(self):
        """A prefill chunk and/or one token per sequence: (prompt responses, generation
        responses, checkpoints passed in this step)."""
        self.log("step")
        if self.before_step is not None:
            self.before_step()
        prompt_resps, gen_resps = self.gen.next()
        return prompt_resps, gen_resps, self._checkpoints(prompt_resps)

    def _checkpoints(self, prompt_resps) -> list[Checkpoint]:
        hits = []
        for r in prompt_resps:
            w = self.wanted.get(r.uid)
            if w is None or not r.end_of_segment:
                continue
            if r.end_of_prompt:
                del self.wanted[r.uid]
                continue
            if w[0] + r.progress[0] in w[1]:
                hits.append(r.uid)
        if not hits:
            return []
        return [Checkpoint(uid, list(tokens), cache) for uid, (cache, tokens) in self.gen.extract_cache(hits).items()]

    def reset(self) -> None:
        """A fresh generator after a failed step (the old one's sequences are gone)."""
        self.gen.close()
        self.wanted.clear()
        self.gen = self._new()
