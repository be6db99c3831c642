"""The reload diff (daemon/lifecycle/plan.py) as a pure function: situations in, actions out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from daemon.config import parse_config
from daemon.lifecycle.plan import (Add, CancelPending, Keep, Remove, Replace, ReplaceNow, Retarget, Update,
                                   plan)


def config(**batch):
    """One model per keyword: name -> engine.max_batch_size (a worker setting), or (size, alias)
    for a live setting too."""
    def one(n, b):
        size, alias = b if isinstance(b, tuple) else (b, None)
        aliases = f", aliases: [{alias}]" if alias else ""
        return f"{{name: {n}, source: embedded:smollm2, engine: {{max_batch_size: {size}}}{aliases}}}"
    return parse_config(f"models: [{', '.join(one(n, b) for n, b in batch.items())}]\n")


def entry(batch, name: str = "m"):
    return config(**{name: batch}).models[0]


@dataclass
class H:
    """A handle as the plan sees it."""
    cfg: object
    state: str = "ready"

    @property
    def running(self) -> bool:
        return self.state in ("loading", "ready", "restarting", "draining")


def test_added_removed_updated_unchanged():
    handles = {"a": H(entry(8, "a")), "b": H(entry(8, "b")), "c": H(entry(8, "c"))}
    new = config(a=8, c=(8, "see"), d=8)
    assert plan(new, handles, {}) == [Remove("b"), Keep("a"), Update(new.models[1]), Add(new.models[2])]


@pytest.mark.parametrize("state", ["ready", "loading", "restarting"])
def test_a_changed_worker_setting_of_a_running_model_loads_a_replacement_beside_it(state):
    new = config(m=4)
    assert plan(new, {"m": H(entry(8), state)}, {}) == [Replace(new.models[0])]


@pytest.mark.parametrize("state", ["stopped", "stopping"])
def test_a_changed_model_with_no_worker_is_replaced_at_once(state):
    new = config(m=4)
    assert plan(new, {"m": H(entry(8), state)}, {}) == [ReplaceNow(new.models[0])]


def test_a_failed_model_is_retried_on_any_reload():
    new = config(m=8)
    assert plan(new, {"m": H(entry(8), "failed")}, {}) == [ReplaceNow(new.models[0])]


def test_an_edit_to_what_is_already_loading_only_retargets_the_replacement():
    new = config(m=(4, "x"))
    assert plan(new, {"m": H(entry(8))}, {"m": H(entry(4), "loading")}) == [Retarget(new.models[0])]


def test_a_third_setting_cancels_the_replacement_and_loads_another():
    new = config(m=2)
    assert plan(new, {"m": H(entry(8))}, {"m": H(entry(4), "loading")}) == [CancelPending("m"),
                                                                             Replace(new.models[0])]


def test_a_removed_model_loses_its_replacement_too():
    assert plan(config(n=8), {"m": H(entry(8))}, {"m": H(entry(4), "loading")})[:2] == [CancelPending("m"),
                                                                                        Remove("m")]


# -- defect 1: a replacement nobody wants any more is cancelled ---------------------------

@pytest.mark.parametrize("state", ["ready", "loading", "restarting"])
def test_a_revert_before_the_replacement_is_ready_cancels_it(state):
    new = config(m=8)
    assert plan(new, {"m": H(entry(8), state)}, {"m": H(entry(4), "loading")}) == [CancelPending("m"), Keep("m")]


def test_a_revert_that_also_changes_a_live_setting_cancels_and_updates():
    new = config(m=(8, "x"))
    assert plan(new, {"m": H(entry(8))}, {"m": H(entry(4), "loading")}) == [CancelPending("m"),
                                                                             Update(new.models[0])]


@pytest.mark.parametrize("state", ["stopped", "stopping"])
def test_an_edit_while_parked_cancels_the_replacement_loading_for_the_earlier_edit(state):
    new = config(m=2)
    assert plan(new, {"m": H(entry(8), state)}, {"m": H(entry(4), "loading")}) == [CancelPending("m"),
                                                                                    ReplaceNow(new.models[0])]


def test_a_revert_while_parked_cancels_the_replacement():
    new = config(m=8)
    assert plan(new, {"m": H(entry(8), "stopped")}, {"m": H(entry(4), "loading")}) == [CancelPending("m"),
                                                                                        Keep("m")]


def test_an_edit_after_the_model_failed_cancels_the_replacement():
    new = config(m=2)
    assert plan(new, {"m": H(entry(8), "failed")}, {"m": H(entry(4), "loading")}) == [CancelPending("m"),
                                                                                       ReplaceNow(new.models[0])]
