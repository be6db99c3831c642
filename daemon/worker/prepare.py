"""Rendering and tokenizing requests off the engine's thread.

A multi-megabyte prompt takes seconds to render and tokenize (4 MB: ~4 s on this CPU); on
the engine's thread that would stall every stream of the model, and past
`worker_hang_timeout` the worker would be killed. So the worker's main loop hands each
`submit` and `count_tokens` to `Preparer`'s threads (HF tokenizers release the GIL while
they encode) and gets a `Prepared` back through its inbox, checkpoint positions included
(finding them renders the template twice more); the engine only builds the request's
output and sampler and inserts it.

Before tokenizing, a prompt longer in characters than the context could ever hold is
refused: no token stands for more characters than the longest token string of the
vocabulary, so a text of more than (context_length - 1) x longest characters cannot fit.
That holds only for tokenizers that never shrink text (`char_limit` says which); for the
others the check is off and the token count decides, as before.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Optional

log = logging.getLogger("mlxd.worker")

WORKERS = 2     # a huge prompt being tokenized does not hold up every other request's start


class Prepared(NamedTuple):
    tokens: list[int]
    prompt_text: str    # the rendered chat prompt ("" for a completion)
    max_tokens: int     # clamped to the room the context leaves
    checkpoints: tuple = ()   # prompt positions its prefill keeps a cache at (engine.checkpoint_positions)


# Components that never make text shorter than the tokens it becomes: normalizers that only
# add or replace one-for-one, pre-tokenizers that split without dropping anything.
_NORMALIZERS = {"Prepend", "Replace", "Sequence"}
_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "Sequence"}


def _types(state: Optional[dict], key: str) -> list[dict]:
    """A tokenizer component's JSON state, flattened through its Sequences."""
    if not state:
        return []
    out = [state]
    for child in state.get(key) or []:
        out += _types(child, key)
    return out


def _state(component) -> Optional[dict]:
    return json.loads(component.__getstate__()) if component is not None else None


def _never_shrinks(backend) -> bool:
    for n in _types(_state(backend.normalizer), "normalizers"):
        if n["type"] not in _NORMALIZERS:
            return False
        if n["type"] == "Replace":
            pattern = n.get("pattern", {})
            if "String" not in pattern or len(n.get("content", "")) < len(pattern["String"]):
                return False
    pres = _types(_state(backend.pre_tokenizer), "pretokenizers")
    for p in pres:
        if p["type"] not in _PRE_TOKENIZERS or p.get("behavior") == "Removed":
            return False
    model = backend.model
    kind = type(model).__name__
    if kind == "BPE":
        # An unknown token may swallow a run of characters, unless every byte has a token.
        return bool(model.byte_fallback) or model.unk_token is None or any(p["type"] == "ByteLevel" for p in pres)
    return False        # WordPiece, WordLevel, Unigram: an unknown token covers a whole word or run


def char_limit(tokenizer, context_length: int) -> Optional[int]:
    """The most characters a prompt that fits the context can have, or None when this
    tokenizer gives no such bound (a normalizer or an unknown token can shrink text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is None or not _never_shrinks(backend):
            return None
        longest = max(len(t) for t in tokenizer.get_vocab())
    except Exception as e:      # a tokenizer we cannot inspect: no bound, the token count decides
        log.info("no character bound on prompts for this tokenizer (%s: %s)", type(e).__name__, e)
        return None
    return max(context_length - 1, 0) * longest


class Preparer:
    """Runs `engine.prepare` (render, tokenize, check) and count_tokens on its own threads;
    `post` (the inbox's put) gets each result as a frame for the main loop:
    `{"op": "prepared", "msg": submit, "prepared": Prepared}` or `..., "error": exception}`,
    and `{"op": "reply", "frame": token_count}`."""

    def __init__(self, engine, post: Callable[[dict], None], workers: int = WORKERS):
        self.engine, self.post = engine, post
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")
        self.lock = threading.Lock()
        self.pending: set[str] = set()      # submits being prepared
        self.cancelled: set[str] = set()

    def submit(self, msg: dict) -> None:
        with self.lock:
            self.pending.add(msg["id"])
        self.pool.submit(self._prepare, msg)

    def cancel(self, rid: str) -> bool:
        """True when the request is still being prepared: it is dropped when that ends."""
        with self.lock:
            if rid in self.pending:
                self.cancelled.add(rid)
                return True
        return False

    def taken(self, rid: str) -> bool:
        """The main loop takes a prepared request: False when it was cancelled meanwhile."""
        with self.lock:
            self.pending.discard(rid)
            if rid in self.cancelled:
                self.cancelled.discard(rid)
                return False
        return True

    @property
    def count(self) -> int:
        return len(self.pending)

    def _prepare(self, msg: dict) -> None:
        try:
            self.post({"op": "prepared", "msg": msg, "prepared": self.engine.prepare(msg)})
        except Exception as e:
            self.post({"op": "prepared", "msg": msg, "error": e})

    def count_tokens(self, msg: dict) -> None:
        self.pool.submit(self._count, msg)

    def _count(self, msg: dict) -> None:
        from .engine import RequestError

        seq = msg.get("seq")
        try:
            frame = {"op": "token_count", "seq": seq, "tokens": len(self.engine.tokenize(msg)[0])}
        except RequestError as e:
            frame = {"op": "token_count", "seq": seq, "error": {"message": str(e), "code": e.code, "param": e.param}}
        except Exception as e:
            log.exception("count_tokens failed")
            frame = {"op": "token_count", "seq": seq, "internal": True,
                     "error": {"message": f"internal error: {type(e).__name__}: {e}", "code": "internal_error"}}
        self.post({"op": "reply", "frame": frame})

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
