"""Reload, load, park and crash races on the real Supervisor and ModelHandle, with worker
doubles (tests/fake_worker.py) behind the lifecycle's worker seam: milliseconds each."""

from __future__ import annotations

import asyncio

import pytest

from daemon.config import parse_config
from daemon.lifecycle import handle as handle_mod
from daemon.lifecycle.supervisor import Supervisor
from fake_worker import Farm, until

CONFIG = "models: [{name: m, source: embedded:smollm2, preload: true}]\n"


def config(batch: int, preload: bool = True):
    return parse_config("models: [{name: m, source: embedded:smollm2, preload: %s, "
                        "engine: {max_batch_size: %d}}]\n" % ("true" if preload else "false", batch))


async def served(sup) -> dict:
    """The `done` event of one request to model m: which worker answered, with what settings."""
    async for ev in sup.get("m").generate({"messages": []}):
        if ev["op"] == "done":
            return ev
    raise AssertionError("no done event")


async def serving(cfg):
    """A started supervisor whose one model is ready on its first fake worker."""
    farm = Farm()
    sup = Supervisor(cfg, spawn=farm.spawn)
    await sup.start()
    await until(lambda: len(farm.workers) == 1)
    farm.workers[0].ready()
    await until(lambda: sup.get("m").state == "ready")
    return farm, sup


def run(main):
    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_edit_switches_routing_once_the_replacement_is_ready_and_drains_the_old():
    async def main():
        farm, sup = await serving(config(8))
        await sup.apply(config(4))
        await until(lambda: len(farm.workers) == 2)
        assert (await served(sup))["max_batch_size"] == 8          # the old one serves while the new loads
        farm.workers[1].ready()
        await until(lambda: not sup.pending and farm.workers[0].exited.done())
        ev = await served(sup)
        assert ev["max_batch_size"] == 4 and ev["served_by"] == farm.workers[1].pid
        assert farm.workers[0].stopped_cleanly
        await sup.stop()
    run(main)


def test_a_replacement_that_fails_to_load_leaves_the_old_one_serving():
    async def main():
        farm, sup = await serving(config(8))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(handle_mod, "BACKOFF", (0.0,))
            await sup.apply(config(4))
            for i in range(1, 1 + handle_mod.MAX_QUICK_CRASHES):
                await until(lambda: len(farm.workers) > i)
                farm.workers[i].fail_load()
            await until(lambda: not sup.pending)
        assert "new settings failed to load" in sup.last_error
        assert (await served(sup))["served_by"] == farm.workers[0].pid
        await sup.stop()
    run(main)


# -- defect 1: the daemon never ends up serving settings the config reverted away from ------

async def started(farm, sup, batch: int = 8):
    await sup.start()
    await until(lambda: len(farm.workers) == 1)
    farm.workers[0].ready()
    await until(lambda: sup.get("m").state == "ready")


def test_a_revert_before_the_replacement_is_ready_keeps_the_old_worker():
    """Reproduced on a real daemon: max_batch_size 8 -> 4 and back 1.5 s later served the 4 worker."""
    async def main():
        farm = Farm()
        sup = Supervisor(config(8), spawn=farm.spawn)
        await started(farm, sup)
        await sup.apply(config(4))
        await until(lambda: len(farm.workers) == 2)
        changes = await sup.apply(config(8))
        assert changes["unchanged"] == ["m"]
        farm.workers[1].ready()               # too late: it must not take over
        await until(lambda: farm.workers[1].exited.done())
        assert not sup.pending
        ev = await served(sup)
        assert ev["served_by"] == farm.workers[0].pid and ev["max_batch_size"] == 8
        await sup.stop()
    run(main)


def test_an_edit_while_parked_is_not_overtaken_by_the_earlier_edits_replacement():
    async def main():
        farm = Farm()
        sup = Supervisor(config(8), spawn=farm.spawn)
        await started(farm, sup)
        await sup.apply(config(4))
        await until(lambda: len(farm.workers) == 2)
        await sup.get("m").unload(0)          # parked (idle TTL, the budget or the console)
        await sup.apply(config(2))
        await until(lambda: len(farm.workers) == 3)
        farm.workers[2].ready()
        farm.workers[1].ready()
        await until(lambda: farm.workers[1].exited.done())
        assert not sup.pending
        assert (await served(sup))["max_batch_size"] == 2
        await sup.stop()
    run(main)


def test_a_revert_while_parked_cancels_the_replacement():
    async def main():
        farm = Farm(auto_ready=False)
        sup = Supervisor(config(8), spawn=farm.spawn)
        await started(farm, sup)
        await sup.apply(config(4))
        await until(lambda: len(farm.workers) == 2)
        await sup.get("m").unload(0)
        await sup.apply(config(8))
        farm.workers[1].ready()
        await until(lambda: farm.workers[1].exited.done())
        assert not sup.pending
        farm.auto_ready = True                # the parked model loads at its next request
        assert (await served(sup))["max_batch_size"] == 8
        await sup.stop()
    run(main)


def test_an_edit_after_the_model_failed_is_not_overtaken_by_the_earlier_edits_replacement(monkeypatch):
    monkeypatch.setattr(handle_mod, "BACKOFF", (0.0,))

    async def main():
        farm = Farm()
        sup = Supervisor(config(8), spawn=farm.spawn)
        await started(farm, sup)
        h = sup.get("m")
        await sup.apply(config(4))
        await until(lambda: len(farm.workers) == 2)
        replacement = farm.workers[1]
        crashes = 0
        while h.state != "failed":            # the old model crashes until it is marked failed
            live = [w for w in farm.alive() if w is not replacement]
            if live and h.state == "ready":
                live[0].crash()
                crashes += 1
            elif live and h.state == "loading":
                live[0].ready()
            await asyncio.sleep(0.001)
        await sup.apply(config(2))
        await until(lambda: sup.get("m") is not h and sup.get("m").state == "loading")
        farm.alive()[-1].ready()
        replacement.ready()
        await until(lambda: replacement.exited.done())
        assert not sup.pending
        assert (await served(sup))["max_batch_size"] == 2
        await sup.stop()
    run(main)


# -- defect 11: one owner of the handle's state and its worker ---------------------------

def test_a_hung_worker_is_killed_by_the_owner_task_and_restarted(monkeypatch):
    monkeypatch.setattr(handle_mod, "STATS_INTERVAL", 0.01)
    monkeypatch.setattr(handle_mod, "BACKOFF", (0.0,))

    async def main():
        farm = Farm(auto_ready=True)
        sup = Supervisor(parse_config("server: {worker_hang_timeout: 1}\n" + CONFIG), spawn=farm.spawn)
        await sup.start()
        await until(lambda: sup.get("m").state == "ready")
        farm.workers[0].hang()
        await until(lambda: len(farm.workers) == 2 and sup.get("m").state == "ready")
        assert "hung" in farm.workers[0].exit_reason and "hung" in sup.get("m").last_error
        await sup.stop()
    run(main)


def test_kill_workers_goes_through_each_handle_to_whatever_worker_it_has():
    async def main():
        farm = Farm(auto_ready=True)
        sup = Supervisor(config(8), spawn=farm.spawn)
        await sup.start()
        await until(lambda: sup.get("m").state == "ready")
        sup.kill_workers()                    # the second stop signal: synchronous, before os._exit
        assert farm.workers[0].exited.done()
        await sup.stop()
    run(main)


def test_a_bug_in_the_lifecycle_ends_in_failed_through_the_transition_table():
    def broken_spawn(cfg, cache_dir, server):
        raise RuntimeError("a bug")

    async def main():
        sup = Supervisor(config(8), spawn=broken_spawn)
        await sup.start()
        h = sup.handles["m"]
        assert await asyncio.wait_for(h.settled(), 5) == "failed"
        assert "a bug" in h.last_error
        assert not await h._state_change(0.01)    # no stale "changed" signal left behind
        await sup.stop()
    run(main)


def test_cache_and_count_calls_reach_the_worker_only_through_a_ready_handle():
    async def main():
        farm = Farm()
        sup = Supervisor(config(8, preload=False), spawn=farm.spawn)
        await sup.start()
        h = sup.get("m")
        with pytest.raises(handle_mod.ModelUnavailable, match="not ready"):
            await h.call("stats")
        farm.auto_ready = True
        assert (await h.call("count_tokens", load=True, messages=[]))["tokens"] == 3
        assert "count_tokens" in farm.workers[0].calls
        await sup.stop()
    run(main)


# -- defect 10: a request timeout is a timeout, not a cancellation --------------------------

def test_a_request_timeout_is_counted_as_a_timeout():
    async def main():
        farm = Farm(auto_ready=True, answer_at_once=False)
        sup = Supervisor(config(8), spawn=farm.spawn)
        await sup.start()
        await until(lambda: sup.get("m").state == "ready")
        from daemon.process import RequestTimeout
        with pytest.raises(RequestTimeout):
            async for _ in sup.get("m").generate({"messages": []}, timeout=0.05):
                pass
        value = lambda reason: sup.metrics.registry.get_sample_value(
            "mlxd_request_errors_total", {"model": "m", "reason": reason})
        assert value("timeout") == 1 and not value("cancelled")
        await sup.stop()
    run(main)


# -- count_tokens is admitted like a generation ------------------------------------------

def test_count_tokens_is_behind_the_rate_limit_and_the_models_request_slots():
    from daemon.api.app import create_app

    async def main():
        farm = Farm(auto_ready=True, answer_at_once=False)
        sup = Supervisor(parse_config("server: {rate_limit: {requests_per_minute: 2}}\n"
                                      "models: [{name: m, source: embedded:smollm2, "
                                      "engine: {max_batch_size: 1, max_waiting: 0}}]\n"), spawn=farm.spawn)
        await sup.start()
        await until(lambda: sup.get("m").state == "ready")
        client = create_app(sup, port=80).test_client()   # the test client sends "Host: localhost"
        body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        busy = sup.get("m").generate({"messages": []})
        await anext(busy)                                  # the one slot is taken
        r = await client.post("/v1/messages/count_tokens", json=body)
        assert r.status_code == 529 and (await r.get_json())["error"]["type"] == "overloaded_error"   # Anthropic's "full"
        farm.workers[0].requests[0].put_nowait("done")
        async for _ in busy:
            pass
        r = await client.post("/v1/messages/count_tokens", json=body)
        assert r.status_code == 200 and (await r.get_json())["input_tokens"] == 3
        r = await client.post("/v1/messages/count_tokens", json=body)   # the third in a minute
        assert r.status_code == 429 and "Rate limit" in (await r.get_json())["error"]["message"]
        await sup.stop()
    run(main)
