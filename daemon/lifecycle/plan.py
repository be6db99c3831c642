"""The reload diff as a pure function: (new config, handles, pending) -> actions.

No I/O and no awaits: the supervisor carries the actions out, and tests run sequences of
edits (edit, revert, edit while parked / failed / loading) through it in microseconds. A
handle is seen only through its config, its state and whether it runs (`View`); the old
config is the handles' own entries, which are what runs (a runtime stop or failure changes a
handle between reloads, the config file does not say so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Union

from ..config import Config, ModelConfig


class View(Protocol):
    """What the plan reads of a handle (a ModelHandle is one)."""
    cfg: ModelConfig
    state: str

    @property
    def running(self) -> bool: ...


@dataclass(frozen=True)
class Add:
    """A model new to the config: a fresh handle (it loads now if preloaded)."""
    cfg: ModelConfig


@dataclass(frozen=True)
class Remove:
    """Gone from the config: unroute it and drain it."""
    name: str


@dataclass(frozen=True)
class ReplaceNow:
    """Changed (or failed) with no worker to switch over from: the new handle takes the route at once."""
    cfg: ModelConfig


@dataclass(frozen=True)
class Replace:
    """Changed while it serves: a replacement loads beside it; routing switches once it is ready."""
    cfg: ModelConfig


@dataclass(frozen=True)
class Retarget:
    """The replacement already loading has the wanted worker settings: only its entry changes."""
    cfg: ModelConfig


@dataclass(frozen=True)
class CancelPending:
    """The replacement loading for this model is no longer wanted."""
    name: str


@dataclass(frozen=True)
class Update:
    """Only live settings changed (aliases, sampling, max_waiting, share_across_keys): the routed handle takes the entry."""
    cfg: ModelConfig


@dataclass(frozen=True)
class Keep:
    name: str


Action = Union[Add, Remove, ReplaceNow, Replace, Retarget, CancelPending, Update, Keep]
KIND = {Add: "added", Remove: "removed", ReplaceNow: "replaced", Replace: "replaced", Retarget: "replaced",
        Update: "updated", Keep: "unchanged"}     # what /admin/reload reports; CancelPending reports nothing


def plan(new: Config, handles: Mapping[str, View], pending: Mapping[str, View]) -> list[Action]:
    """The actions that take the routed `handles` (and the replacements loading in `pending`)
    to `new`, in order."""
    wanted = {m.name: m for m in new.models}
    actions: list[Action] = []
    for name in handles:
        if name not in wanted:
            if name in pending:
                actions.append(CancelPending(name))
            actions.append(Remove(name))
    for name, m in wanted.items():
        h = handles.get(name)
        if h is None:
            actions.append(Add(m))
            continue
        changed = h.cfg.worker_key() != m.worker_key() or h.state == "failed"
        p = pending.get(name)
        if p is not None and not (changed and h.running and p.cfg.worker_key() == m.worker_key()):
            # A replacement loads only to take over a running worker with the settings wanted
            # now: reverted, superseded, or the old handle parked or failed, it would switch in
            # settings the config no longer names (it used to, silently).
            actions.append(CancelPending(name))
            p = None
        if changed and not h.running:
            actions.append(ReplaceNow(m))
        elif changed:
            actions.append(Retarget(m) if p is not None else Replace(m))
        elif h.cfg != m:
            actions.append(Update(m))
        else:
            actions.append(Keep(name))
    return actions
