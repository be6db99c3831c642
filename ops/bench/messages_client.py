"""The agent session over Anthropic's Messages API, for agent.py's Messages run.

`to_messages` turns an opencode-shaped Chat Completions request (system message, tools,
assistant `tool_calls`, `tool` messages) into the Messages request Claude Code would send for
the same conversation, so mlxd renders the same prompt either way; `stream_messages` sends it
with the official `anthropic` SDK, streamed, and times it like `common.stream_chat`.
"""

from __future__ import annotations

import json
import time


def to_messages(messages: list[dict], tools: list[dict] | None = None) -> dict:
    """system, messages and tools of the Messages request equivalent to a chat request."""
    system, out = [], []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role in ("system", "developer") and not out:
            system.append({"type": "text", "text": content})
        elif role == "assistant":
            blocks = [{"type": "text", "text": content}] if content else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": json.loads(c["function"]["arguments"] or "{}")} for c in m.get("tool_calls") or []]
            out.append({"role": "assistant", "content": blocks})
        elif role == "tool":
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": content}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list) and \
                    out[-1]["content"][-1].get("type") == "tool_result":
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        else:
            out.append({"role": role, "content": content})
    body = {"system": system, "messages": out}
    if tools:
        body["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                          "input_schema": t["function"].get("parameters") or {"type": "object"}} for t in tools]
    return body


def stream_messages(url: str, model: str, messages: list[dict], max_tokens: int, timeout: float = 600,
                    tools: list[dict] | None = None, tool_choice: str = "auto") -> dict:
    """One greedy streamed Messages request, timed per output delta; `common.stream_chat`'s keys."""
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="bench", timeout=timeout, max_retries=0)
    body = to_messages(messages, tools)
    if tools:
        body["tool_choice"] = {"type": {"required": "any"}.get(tool_choice, tool_choice)}
    times, parts, kinds, usage, finish = [], [], [], {}, None
    t0 = time.perf_counter()
    for ev in client.messages.create(model=model, max_tokens=max_tokens, stream=True,
                                     extra_body={"temperature": 0.0}, **body):
        if ev.type == "message_start":
            usage = ev.message.usage.model_dump()
        elif ev.type == "content_block_start" and ev.content_block.type == "tool_use":
            times.append(time.perf_counter())
            kinds.append("tool_calls")
        elif ev.type == "content_block_delta":
            times.append(time.perf_counter())
            kind = {"text_delta": "content", "thinking_delta": "reasoning_content"}.get(ev.delta.type, "tool_calls")
            kinds.append(kind)
            if ev.delta.type == "text_delta":
                parts.append(ev.delta.text)
        elif ev.type == "message_delta":
            usage["output_tokens"] = ev.usage.output_tokens
            finish = ev.delta.stop_reason
    n = usage.get("output_tokens") or len(times)
    cached = usage.get("cache_read_input_tokens") or 0
    return {
        "ttft": times[0] - t0 if times else None,
        "decode_tps": (n - 1) / (times[-1] - times[0]) if len(times) > 1 and n > 1 else None,
        "completion_tokens": n, "chunks": len(times),
        "prompt_tokens": (usage.get("input_tokens") or 0) + cached, "cached_tokens": cached,
        "total": time.perf_counter() - t0, "text": "".join(parts), "finish_reason": finish,
        "first_kind": kinds[0] if kinds else None, "tool_call_chunks": kinds.count("tool_calls"),
    }
