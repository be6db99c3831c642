"""Pure logic of the shared request path: keep-alives, noise lines, error shapes, the responses store."""

from __future__ import annotations

import asyncio

from daemon.api.errors import APIError, shape_of
from daemon.api.requests import drop_noise, heartbeat
from daemon.api.responses import Store


def test_heartbeat_ticks_while_the_source_is_silent_and_closes_it():
    closed = []

    async def slow():
        try:
            yield "a"
            await asyncio.sleep(0.5)        # ten intervals of silence
            yield "b"
            await asyncio.sleep(60)
            yield "never"
        finally:
            closed.append(True)

    async def run():
        out = []
        async for ev in heartbeat(slow(), 0.05):
            out.append(ev)
            if ev == "b":
                break
        return out

    out = asyncio.run(run())
    assert out[0] == "a" and out[-1] == "b" and None in out[1:-1]
    assert set(out[1:-1]) == {None}
    assert closed == [True]


def test_heartbeat_passes_errors_through():
    async def failing():
        yield 1
        raise APIError(504, "too slow")

    async def run():
        got = []
        try:
            async for ev in heartbeat(failing(), 10):
                got.append(ev)
        except APIError as e:
            return got, e.status

    assert asyncio.run(run()) == ([1], 504)


def test_drop_noise():
    prefixes = ("x-anthropic-billing-header:",)
    assert drop_noise("x-anthropic-billing-header: cch=1;", prefixes) == ""
    assert drop_noise("x-anthropic-billing-header: a\nYou are Claude Code.", prefixes) == "You are Claude Code."
    assert drop_noise("You are x-anthropic-billing-header: kept", prefixes) == "You are x-anthropic-billing-header: kept"
    assert drop_noise("x-anthropic-billing-header: a", ()) == "x-anthropic-billing-header: a"


def test_error_shapes():
    e = APIError(400, "Invalid value for 'max_tokens': too big", param="max_tokens")
    assert e.body()["error"]["param"] == "max_tokens"
    assert e.anthropic_body() == {"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": "Invalid value for 'max_tokens': too big"}}
    full = APIError(429, "full", type_="rate_limit_error", code="model_at_capacity")
    assert full.anthropic_status() == 529 and full.anthropic_body()["error"]["type"] == "overloaded_error"
    assert APIError(503, "gone", type_="server_error").anthropic_body()["error"]["type"] == "api_error"
    assert APIError(401, "no key").anthropic_body()["error"]["type"] == "authentication_error"
    assert shape_of("/v1/messages") == shape_of("/v1/messages/count_tokens") == "anthropic"
    assert shape_of("/v1/responses") == shape_of("/v1/messagesx") == "openai"


def test_responses_store_is_bounded_live():
    size = [2]
    s = Store(lambda: size[0])
    for i in range(3):
        s.put("k", f"r{i}", [{"role": "user", "content": str(i)}])
    assert s.get("k", "r0") is None and s.get("k", "r2")[0]["content"] == "2"
    assert s.get("other", "r2") is None and s.get("", "r2") is None
    size[0] = 0
    s.put("k", "r3", [])
    assert s.get("k", "r3") is None and not s.items
