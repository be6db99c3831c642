"""The events of one request, worker -> daemon, as typed records.

The worker builds them, the socketpair carries them as JSON frames with an `op`
(`protocol.py`), and the API reads them back with `parse`: one definition for both sides,
so the API never re-parses model text. The supervisor reads only `done` and `error`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional, Union


class _Event:
    op: ClassVar[str]

    def wire(self) -> dict:
        return {"op": self.op, **self.__dict__}


@dataclass
class Started(_Event):
    """The worker accepted the request; usage is known up front."""
    op: ClassVar[str] = "started"
    id: str
    prompt_tokens: int
    cached_tokens: int
    max_tokens: int


@dataclass
class Progress(_Event):
    """A prefill chunk finished (the API turns it into an SSE comment)."""
    op: ClassVar[str] = "progress"
    id: str
    done: int
    total: int


@dataclass
class Text(_Event):
    op: ClassVar[str] = "text"
    id: str
    text: str


@dataclass
class Reasoning(_Event):
    op: ClassVar[str] = "reasoning"
    id: str
    text: str


@dataclass
class ToolCall(_Event):
    """A tool call begins: its id and function name, before any of its arguments."""
    op: ClassVar[str] = "tool_call"
    id: str
    index: int
    call_id: str
    name: str


@dataclass
class ToolArgs(_Event):
    """More of a call's arguments (JSON text); a call's deltas concatenate to its arguments."""
    op: ClassVar[str] = "tool_args"
    id: str
    index: int
    arguments: str


@dataclass
class Logprob(_Event):
    """One generated token's log-probability, and the most likely alternatives when asked."""
    op: ClassVar[str] = "logprob"
    id: str
    token: str
    logprob: float
    top: list = field(default_factory=list)     # [[token, logprob], ...], most likely first


# Why a request got less from the prefix cache than the longest prefix it shares with the
# prompt, or nothing at all (`Done.cache["reason"]`; the `reason` label of
# mlxd_prefix_cache_misses_total): cold (nothing shares a prefix), untrimmable (an entry
# shares more but its cache cannot be cut there: the nearest checkpoint was served),
# evicted (the budgets dropped an entry that shared more), unreadable (its disk file was
# gone or corrupt), unshared (a rank of a distributed group lacked its shard), revision
# (another revision of the model, under another namespace, shares more: its weights,
# tokenizer or chat template, kv_bits or mlx versions changed).
CACHE_MISS_REASONS = ("cold", "untrimmable", "evicted", "unreadable", "unshared", "revision")


@dataclass
class Embedding(_Event):
    """An embedding request's vectors: `count` rows of `dimensions` little-endian float32, base64."""
    op: ClassVar[str] = "embedding"
    id: str
    count: int
    dimensions: int
    data: str


@dataclass
class Done(_Event):
    op: ClassVar[str] = "done"
    id: str
    finish_reason: str
    usage: dict
    timings: dict = field(default_factory=dict)
    itl: list = field(default_factory=list)
    cache_tier: Optional[str] = None
    cache: Optional[dict] = None             # the prefix cache's outcome: tokens, tier, entry, shared, reason, detail
    stop_sequence: Optional[str] = None      # the stop string that ended the text, if one did


@dataclass
class Error(_Event):
    op: ClassVar[str] = "error"
    id: Optional[str]
    message: str
    code: Optional[str] = None
    param: Optional[str] = None
    status: int = 400


Event = Union[Started, Progress, Text, Reasoning, ToolCall, ToolArgs, Logprob, Embedding, Done, Error]
_BY_OP = {c.op: (c, {f.name for f in fields(c)}) for c in (Started, Progress, Text, Reasoning, ToolCall, ToolArgs,
                                                             Logprob, Embedding, Done, Error)}


def parse(msg: dict) -> Event:
    """A wire frame back into its record; fields a newer worker adds are ignored."""
    cls, names = _BY_OP[msg["op"]]
    return cls(**{k: v for k, v in msg.items() if k in names})
