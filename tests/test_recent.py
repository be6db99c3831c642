"""The console's ring of recent requests, on a scripted event stream (pure logic)."""

import asyncio


async def _events(*evs):
    for ev in evs:
        yield ev


def test_recent_requests_ring_keeps_the_last_ones_and_their_outcome():
    from daemon.recent import RecentRequests

    async def run(rec, evs):
        async for _ in rec.track("m", {"messages": []}, _events(*evs)):
            pass

    done = {"op": "done", "finish_reason": "stop", "usage": {"prompt_tokens": 10, "completion_tokens": 5,
            "cached_tokens": 4}, "timings": {"ttft": 0.5, "total": 1.5}}
    rec = RecentRequests(size=3)
    for _ in range(5):
        asyncio.run(run(rec, [{"op": "started", "prompt_tokens": 10, "cached_tokens": 4}, done]))
    asyncio.run(run(rec, [{"op": "started", "prompt_tokens": 7, "cached_tokens": 0},
                          {"op": "progress", "done": 3, "total": 7}]))
    out = rec.records()
    assert len(out) == 3 and [r["id"] for r in out] == [5, 4, 3]
    assert out[0]["status"] == "cancelled" and out[0]["progress"] is None
    assert out[1] | {"id": 0, "time": 0} == {
        "id": 0, "time": 0, "model": "m", "surface": "chat.completions", "prompt_tokens": 10, "cached_tokens": 4,
        "generated": 5, "progress": None, "ttft": 0.5, "tokens_per_s": 4.0, "finish_reason": "stop",
        "status": "ok", "error": None, "cache": None}


def test_a_cache_outcome_reaches_the_ring_and_the_miss_counter():
    """The worker's `done.cache` (pure logic here; the worker's side is tests/test_checkpoints.py)."""
    from prometheus_client import generate_latest

    from daemon.metrics import Metrics

    m = Metrics()
    m.model_added("m")
    outcome = {"tokens": 512, "tier": "memory", "entry": "e1", "shared": 600, "nearest": "e2",
               "reason": "untrimmable", "detail": "entry e2 shares 600 tokens ..."}
    done = {"op": "done", "finish_reason": "stop", "usage": {"prompt_tokens": 700, "completion_tokens": 2,
            "cached_tokens": 512}, "timings": {"ttft": 0.5, "total": 1.5, "queue": 0.0, "prefill": 0.5},
            "cache": outcome}

    async def run():
        async for ev in m.recent.track("m", {"messages": []}, _events({"op": "started", "prompt_tokens": 700,
                                                                        "cached_tokens": 512}, done)):
            if ev["op"] == "done":
                m.request_done("m", ev, cache_enabled=True)
        m.request_done("m", {**done, "cache": {**outcome, "reason": None}}, cache_enabled=True)

    asyncio.run(run())
    assert m.recent.records()[0]["cache"] == outcome
    text = generate_latest(m.registry).decode()
    assert 'mlxd_prefix_cache_misses_total{model="m",reason="untrimmable"} 1.0' in text
    assert 'mlxd_prefix_cache_misses_total{model="m",reason="cold"} 0.0' in text     # present from the start


def test_live_generated_and_tokens_per_s_follow_the_real_worker_stream(tmp_path):
    """On the events a real worker sends (not a scripted stream): before, the ring waited
    for a `delta` event no worker sends, so both stayed 0."""

    from conftest import MODELS_CACHE
    from daemon.config import parse_config
    from daemon.lifecycle.supervisor import Supervisor

    (tmp_path / "models").symlink_to(MODELS_CACHE)
    cfg = parse_config(f"server: {{cache_dir: {tmp_path}}}\n"
                       "models: [{name: m, source: embedded:smollm2, prefix_cache: {enabled: false}}]\n")

    async def main():
        sup = Supervisor(cfg)
        await sup.start()
        try:
            h = sup.get("m")
            assert await asyncio.wait_for(h.settled(), 600) == "ready"
            payload = {"messages": [{"role": "user", "content": "Count from 1 to 30, one number a line."}],
                       "max_tokens": 24, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
            live, ops = [], set()
            async for ev in h.generate(payload):
                ops.add(ev["op"])
                live += [r["generated"] for r in sup.metrics.recent.records() if r["status"] == "running"]
            rate = sup.metrics.recent.tokens_per_s("m")
            return live, ops, rate, sup.metrics.recent.records()[0]
        finally:
            await sup.stop()
    live, ops, rate, final = asyncio.run(main())
    assert "delta" not in ops and "text" in ops                  # what the worker really sends
    assert final["generated"] > 0 and max(live) > 0 and live == sorted(live)
    assert 0 < rate and final["status"] == "ok"
