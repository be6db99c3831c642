"""The embedding worker's engine: the same frames as the generation engine, another job.

The worker loop (`worker/__main__.py`) drives it like `worker/engine.py`'s `Engine`:
`submit` answers `started` at once (usage is known up front), `step` runs one forward pass,
and a finished request gets one `embedding` event (all its vectors, float32, base64) and a
`done` with usage and timings. So lifecycle, reload, budget, TTL, pin, metrics and the
console treat an embedding model like any other.

Batching: every input of every waiting request is an item; each step takes the oldest
waiting item and the items nearest to it in length, as many as fit `batch_tokens` padded,
and padding stays under a fifth of the batch, so short inputs never pay for long ones and the
oldest request always moves.
"""

from __future__ import annotations

import base64
import bisect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..events import Done, Embedding, Started
from ..worker.engine import RequestError, internal_error
from .spec import EmbedSpec

log = logging.getLogger("mlxd.embeddings")

MAX_INPUTS = 2048        # OpenAI's limit per request
MAX_PADDING = 0.2        # of a batch's padded tokens at most


def default_batch_tokens() -> int:
    """`embedding.batch_tokens` when the entry sets none: a CPU gains nothing from wider batches
    and loses to padding and an [L, L] attention that no longer fits its caches."""
    import mlx.core as mx

    return 2048 if mx.default_device() == mx.cpu else 8192


@dataclass
class Job:
    id: str
    vectors: list
    left: int
    tokens: int
    dimensions: Optional[int]
    t_submit: float
    t_first: Optional[float] = None


@dataclass(order=True)
class Item:
    length: int
    seq: int
    job: Job = field(compare=False)
    index: int = field(compare=False)
    ids: list = field(compare=False)


class Affixes:
    """The special tokens the tokenizer wraps around one text ([CLS] ... [SEP], or an EOS), found
    by encoding a probe with and without them, so token-id inputs get the same wrapping."""

    def __init__(self, tokenizer):
        plain = tokenizer.encode("hello", add_special_tokens=False).ids
        full = tokenizer.encode("hello", add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        self.prefix, self.suffix = (full[:at], full[at + len(plain):]) if at is not None else ([], [])

    def wrap(self, ids: list[int]) -> list[int]:
        return [*self.prefix, *ids, *self.suffix]

    def cut(self, ids: list[int], window: int) -> list[int]:
        """The wrapped ids with the content's end cut so that the whole fits `window`."""
        keep = max(window - len(self.prefix) - len(self.suffix), 1)
        return [*self.prefix, *ids[len(self.prefix):len(ids) - len(self.suffix)][:keep], *self.suffix]


class EmbedEngine:
    prefix_cache = None
    spec = None           # speculative decoding: never, for an embedding model

    def __init__(self, embedder, tokenizer, spec: EmbedSpec, settings, name: str):
        self.embedder, self.tokenizer, self.info_spec = embedder, tokenizer, spec
        self.settings, self.name = settings, name
        self.batch_tokens = settings.batch_tokens or default_batch_tokens()
        self.affixes = Affixes(tokenizer)
        self.context_length = spec.max_seq_length
        self.jobs: dict[str, Job] = {}
        self.queue: list[Item] = []          # sorted by (length, arrival)
        self._seq = 0
        self.internal_errors = 0
        self.batch_resets = 0
        self.wake = None
        self.batches = 0
        self.items_done = 0

    # -- what the worker loop asks --------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    @property
    def running(self) -> int:
        return len(self.jobs)

    @property
    def waiting(self) -> int:
        return 0

    def request_ids(self) -> list[str]:
        return list(self.jobs)

    def clear_cache(self) -> int:
        return 0

    def tokenize(self, msg: dict) -> tuple[list[int], str]:
        """count_tokens: an embedding request's tokens; anything else is not for this model."""
        if "embed" not in msg:
            raise self._not_generation()
        rows = self._rows(msg["embed"])
        return [t for r in rows for t in r], ""

    def _not_generation(self) -> RequestError:
        return RequestError(f"model '{self.name}' is an embedding model: it serves /v1/embeddings and Ollama's "
                            "/api/embed, not text generation", code="model_not_supported", param="model")

    # -- requests -------------------------------------------------------------------------

    def _rows(self, req: dict) -> list[list[int]]:
        """Each input's token ids with the model's special tokens, checked against the window."""
        inputs = req.get("input")
        if not isinstance(inputs, list) or not inputs:
            raise RequestError("'input' must be a non-empty list", param="input")
        if len(inputs) > MAX_INPUTS:
            raise RequestError(f"'input' has {len(inputs)} items; at most {MAX_INPUTS} per request", param="input")
        truncate = self.settings.truncate if req.get("truncate") is None else bool(req["truncate"])
        texts = [(i, s) for i, s in enumerate(inputs) if isinstance(s, str)]
        rows: list = [None] * len(inputs)
        for (i, _), enc in zip(texts, self.tokenizer.encode_batch([s for _, s in texts]) if texts else []):
            rows[i] = list(enc.ids)
        vocab = self.embedder.vocab_size
        for i, x in enumerate(inputs):
            if rows[i] is not None:
                continue
            if not isinstance(x, list) or not x or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                raise RequestError(f"input[{i}] must be a string or a non-empty array of token ids", param=f"input[{i}]")
            if (bad := next((t for t in x if not 0 <= t < vocab), None)) is not None:
                raise RequestError(f"input[{i}] has token id {bad}, outside the vocabulary (0..{vocab - 1})",
                                   param=f"input[{i}]")
            rows[i] = self.affixes.wrap(x)
        window = self.context_length
        for i, r in enumerate(rows):
            where = "input" if len(rows) == 1 else f"input[{i}]"
            if not r:       # a tokenizer without special tokens turns "" into nothing to embed
                raise RequestError(f"{where} has no tokens to embed", param=where)
            if len(r) > window:
                if not truncate:
                    raise RequestError(
                        f"{where} has {len(r)} tokens, more than this model's maximum of {window} tokens; "
                        "shorten it (or set embedding.truncate in the model's config, or truncate: true on "
                        "/api/embed)", code="context_length_exceeded", param=where)
                rows[i] = self.affixes.cut(r, window)
        return rows

    def submit(self, msg: dict) -> dict:
        if "embed" not in msg:
            raise self._not_generation()
        req = msg["embed"]
        dims = req.get("dimensions")
        full = self.info_spec.dimensions
        if dims is not None:
            if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= full:
                raise RequestError(f"'dimensions' must be an integer from 1 to {full} for this model",
                                   param="dimensions")
            if dims != full and not (self.info_spec.matryoshka or self.settings.allow_dimensions):
                raise RequestError(
                    f"model '{self.name}' was not trained for shortened embeddings (Matryoshka), so 'dimensions' "
                    f"other than {full} would lose quality; set embedding.allow_dimensions: true in its config "
                    "to allow it", code="dimensions_not_supported", param="dimensions")
            dims = None if dims == full else dims
        rows = self._rows(req)
        rid = msg["id"]
        job = Job(rid, [None] * len(rows), len(rows), sum(map(len, rows)), dims, time.perf_counter())
        self.jobs[rid] = job
        for i, r in enumerate(rows):
            self._seq += 1
            bisect.insort(self.queue, Item(len(r), self._seq, job, i, r))
        return Started(rid, prompt_tokens=job.tokens, cached_tokens=0, max_tokens=0).wire()

    def cancel(self, rid: str) -> Optional[dict]:
        job = self.jobs.pop(rid, None)
        if job is None:
            return None
        self.queue = [it for it in self.queue if it.job is not job]
        return self._done(job, "cancelled")

    # -- the step ---------------------------------------------------------------------------

    def _pick(self) -> list[Item]:
        """The oldest item and its neighbours in length, while the padded batch fits batch_tokens
        and padding stays under MAX_PADDING of it (a CPU gains little from a wider batch, and
        attention's cost grows with the square of the padded length)."""
        q, budget = self.queue, self.batch_tokens
        anchor = min(range(len(q)), key=lambda k: q[k].seq)
        lo, hi = anchor, anchor + 1           # q[lo:hi] is the batch; sorted, so q[hi-1] is the longest
        real = q[anchor].length

        def fits(longest: int, rows: int, tokens: int) -> bool:
            padded = longest * rows
            return padded <= budget and padded - tokens <= MAX_PADDING * padded

        while True:
            rows = hi - lo + 1
            grow_lo = lo > 0 and fits(q[hi - 1].length, rows, real + q[lo - 1].length)
            grow_hi = hi < len(q) and fits(q[hi].length, rows, real + q[hi].length)
            if grow_lo and (not grow_hi or q[anchor].length - q[lo - 1].length <= q[hi].length - q[anchor].length):
                lo -= 1
                real += q[lo].length
            elif grow_hi:
                real += q[hi].length
                hi += 1
            else:
                break
        batch = q[lo:hi]
        del q[lo:hi]
        return batch

    def step(self) -> list[dict]:
        batch = self._pick()
        now = time.perf_counter()
        for it in batch:
            it.job.t_first = it.job.t_first or now
        try:
            vecs = self.embedder([it.ids for it in batch])
        except Exception as e:       # fails the requests of this batch; the others go on
            log.exception("embedding batch of %d inputs failed", len(batch))
            self.internal_errors += 1
            return self._fail({it.job.id for it in batch}, e)
        self.batches += 1
        self.items_done += len(batch)
        events = []
        for it, v in zip(batch, vecs):
            job = it.job
            if job.id not in self.jobs:
                continue
            job.vectors[it.index] = v
            job.left -= 1
            if job.left == 0:
                events += self._finish(job)
        return events

    def _finish(self, job: Job) -> list[dict]:
        del self.jobs[job.id]
        arr = np.stack(job.vectors).astype("<f4")
        if job.dimensions is not None:
            arr = arr[:, :job.dimensions]
            arr = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
        data = base64.b64encode(np.ascontiguousarray(arr, dtype="<f4").tobytes()).decode()
        return [Embedding(job.id, count=arr.shape[0], dimensions=arr.shape[1], data=data).wire(),
                self._done(job, "stop")]

    def _fail(self, ids: set, e: BaseException) -> list[dict]:
        events = []
        for rid in ids:
            if self.jobs.pop(rid, None) is not None:
                events.append(internal_error(rid, e))
        self.queue = [it for it in self.queue if it.job.id in self.jobs]
        return events

    def reset(self, e: Exception) -> list[dict]:
        log.error("embedding step failed (%s: %s); failing every request", type(e).__name__, e, exc_info=e)
        self.batch_resets += 1
        return self._fail(set(self.jobs), e)

    def _done(self, job: Job, reason: str) -> dict:
        now = time.perf_counter()
        first = job.t_first or now
        return Done(job.id, reason, usage={"prompt_tokens": job.tokens, "completion_tokens": 0, "cached_tokens": 0},
                    timings={"queue": first - job.t_submit, "prefill": now - first,
                             "ttft": now - job.t_submit, "total": now - job.t_submit}).wire()


def load(cfg, path: Path, dtype: str):
    """The engine for an embedding model directory, and what the worker reports of it."""
    from tokenizers import Tokenizer

    from .models import Embedder
    from .spec import SpecError, detect

    spec = detect(path, cfg.embedding)
    if not (path / "tokenizer.json").is_file():
        raise SpecError(f"{path} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()        # sentence-transformers' files ship a fixed padding and truncation
    tokenizer.no_truncation()
    embedder = Embedder(path, spec, dtype)
    return EmbedEngine(embedder, tokenizer, spec, cfg.embedding, cfg.name), spec
