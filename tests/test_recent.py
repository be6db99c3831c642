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
