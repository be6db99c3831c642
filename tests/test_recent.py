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
        "status": "ok", "error": None}


def test_live_generated_and_tokens_per_s_follow_the_real_worker_stream(tmp_path):
    """On the events a real worker sends (not a scripted stream): before, the ring waited
    for a `delta` event no worker sends, so both stayed 0."""
    import time as time_

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
