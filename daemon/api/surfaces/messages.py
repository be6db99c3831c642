"""Anthropic's Messages as a surface: turns in the chat template's shape, tools as OpenAI
functions, `tool_choice` in OpenAI's forms (grammar enforces `any` and `tool`); the worker's
typed events become content blocks. Streams send `event: ping` while a long prefill runs:
these clients ignore SSE comments. A stream that waits longer than a ping's period for the
worker (a model's load, a grammar compile) sends `message_start` and a ping at once; its
prompt's usage then comes in `message_delta`, which always carries the full usage
(cumulative, as Anthropic's does)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from ... import events as ev_
from .. import requests as rq
from ..errors import APIError
from . import Surface, arguments_object
from .payload import check_tools, sampling

_NO_USAGE = ev_.Started(id="", prompt_tokens=0, cached_tokens=0, max_tokens=0)


# -- request -> payload -------------------------------------------------------------------

def _system_text(system) -> str:
    if system is None:
        return ""
    blocks = [system] if isinstance(system, str) else [b.text for b in system]
    noise = rq.noise_prefixes()
    return "\n\n".join(t for t in (rq.drop_noise(b, noise) for b in blocks) if t)


def _messages(body) -> list[dict]:
    """Anthropic's turns in the chat template's shape: tool_use blocks become an assistant's
    `tool_calls`, tool_result blocks `tool` messages, thinking blocks `reasoning_content`."""
    out: list[dict] = []
    noise = rq.noise_prefixes()

    def said(role: str, text: str) -> dict:
        return {"role": role, "content": rq.drop_noise(text, noise) if role == "system" else text}

    if system := _system_text(body.system):
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append(said(m.role, m.content))
            continue
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": ""}
            for j, b in enumerate(m.content):
                if b.type == "text":
                    msg["content"] += b.text
                elif b.type in ("thinking", "redacted_thinking"):
                    msg["reasoning_content"] = msg.get("reasoning_content", "") + b.thinking
                elif b.type == "tool_use":
                    msg.setdefault("tool_calls", []).append({"id": b.id, "type": "function", "function": {
                        "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
                else:
                    raise APIError(400, "an assistant message cannot carry tool_result blocks",
                                   param=f"messages.{i}.content.{j}")
            out.append(msg)
            continue
        text: list[str] = []
        for j, b in enumerate(m.content):
            if b.type == "tool_result":
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()})
            elif b.type == "text":
                text.append(b.text)
            else:
                raise APIError(400, f"a {m.role} message cannot carry {b.type} blocks", param=f"messages.{i}.content.{j}")
        if text:
            out.append(said(m.role, "".join(text)))
    return out


def _tool_payload(body) -> dict:
    """Tools as OpenAI functions; `tool_choice` in OpenAI's forms (grammar enforces any/tool)."""
    out: dict[str, Any] = {}
    names = [t.name for t in body.tools or []]
    c = body.tool_choice
    check_tools(names, c.type if c is not None and c.type in ("any", "tool") else None,
                c.name if c is not None and c.type == "tool" else None, "tool_choice.name")
    if names:
        out["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            "parameters": t.input_schema}} for t in body.tools]
    if c is not None:
        out["tool_choice"] = {"auto": "auto", "none": "none", "any": "required"}.get(
            c.type, {"type": "function", "function": {"name": c.name}})
        if c.disable_parallel_tool_use:
            out["parallel_tool_calls"] = False
    if body.thinking is not None:
        out["chat_template_kwargs"] = {"enable_thinking": body.thinking.type != "disabled"}
    oc = body.output_config
    if oc is not None and oc.effort is not None:
        out["reasoning_effort"] = oc.effort
    if oc is not None and oc.format is not None:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": oc.format.schema_}}
    return out


def prompt_payload(body) -> dict:
    """The prompt's part of the payload (messages, tools, format), also what count_tokens renders."""
    return {"messages": _messages(body), **_tool_payload(body)}


# -- events -> content blocks -------------------------------------------------------------

def _usage(started: ev_.Started, output_tokens: int) -> dict:
    """Anthropic counts cached prompt tokens apart from `input_tokens`."""
    return {"input_tokens": started.prompt_tokens - started.cached_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": started.cached_tokens, "cache_creation_input_tokens": 0}


class Messages(Surface):
    """POST /v1/messages: content blocks in order, streamed as block start / delta / stop."""
    params = {"reasoning_effort": "output_config.effort"}

    def __init__(self, body, handle):
        super().__init__(handle, body.stream, body.cache_salt)
        self.body = body
        self.meta = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
                     "model": handle.name}
        self.stops = list(body.stop_sequences or [])
        self.started: Optional[ev_.Started] = None
        self.blocks: list[dict] = []
        self.calls: dict[int, dict] = {}     # the worker's call index -> its tool_use block
        self.args: dict[int, str] = {}
        self.done: Optional[ev_.Done] = None

    def payload(self) -> dict:
        b = self.body
        return {**prompt_payload(b), **sampling(self.handle, b.max_tokens, b.temperature, b.top_p,
                                                 stop=self.stops, top_k=b.top_k), "surface": "messages"}

    def _stop(self) -> tuple[str, Optional[str]]:
        done = self.done
        if done.finish_reason == "tool_calls":
            return "tool_use", None
        if done.finish_reason == "length":
            return "max_tokens", None
        if done.stop_sequence is not None and done.stop_sequence in self.stops:
            return "stop_sequence", done.stop_sequence
        return "end_turn", None

    def _open(self, block: dict, start: dict):
        """Close the open block (if any) and open `block`, streamed as `start`."""
        if self.blocks:
            yield "content_block_stop", {"index": len(self.blocks) - 1}
        self.blocks.append(block)
        yield "content_block_start", {"index": len(self.blocks) - 1, "content_block": start}

    def opening(self, run):
        self.started = run.started
        yield "message_start", {"message": {**self.meta, "content": [], "stop_reason": None, "stop_sequence": None,
                                            "usage": _usage(run.started or _NO_USAGE, 0)}}
        if run.started is None:
            yield "ping", {}            # the worker has not answered yet (a load, a grammar)

    def feed(self, ev):
        last = self.blocks[-1] if self.blocks else None
        if ev is None or isinstance(ev, ev_.Progress):
            yield "ping", {}
        elif isinstance(ev, ev_.Started):
            self.started = ev
        elif isinstance(ev, ev_.Text):
            if last is None or last["type"] != "text":
                yield from self._open({"type": "text", "text": ""}, {"type": "text", "text": ""})
            self.blocks[-1]["text"] += ev.text
            yield "content_block_delta", {"index": len(self.blocks) - 1,
                                          "delta": {"type": "text_delta", "text": ev.text}}
        elif isinstance(ev, ev_.Reasoning):
            if last is None or last["type"] != "thinking":
                yield from self._open({"type": "thinking", "thinking": "", "signature": ""},
                                      {"type": "thinking", "thinking": "", "signature": ""})
            self.blocks[-1]["thinking"] += ev.text
            yield "content_block_delta", {"index": len(self.blocks) - 1,
                                          "delta": {"type": "thinking_delta", "thinking": ev.text}}
        elif isinstance(ev, ev_.ToolCall):
            block = {"type": "tool_use", "id": ev.call_id, "name": ev.name, "input": {}}
            self.calls[ev.index], self.args[ev.index] = block, ""
            yield from self._open(block, dict(block, input={}))
        elif isinstance(ev, ev_.ToolArgs):
            self.args[ev.index] = self.args.get(ev.index, "") + ev.arguments
            if last is not None and last is self.calls.get(ev.index):
                yield "content_block_delta", {"index": len(self.blocks) - 1, "delta": {
                    "type": "input_json_delta", "partial_json": ev.arguments}}
        elif isinstance(ev, ev_.Done):
            self.done = ev
            if self.blocks:
                yield "content_block_stop", {"index": len(self.blocks) - 1}
            reason, seq = self._stop()
            yield "message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq},
                                    "usage": _usage(self.started or _NO_USAGE, ev.usage["completion_tokens"])}
            yield "message_stop", {}

    def failed(self, e):
        yield "error", {"error": e.anthropic_body()["error"]}

    def encode(self, item) -> bytes:
        kind, data = item
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n".encode()

    def final(self) -> dict:
        for i, call in self.calls.items():
            call["input"] = arguments_object(self.args[i])
        reason, seq = self._stop()
        return {**self.meta, "content": self.blocks, "stop_reason": reason, "stop_sequence": seq,
                "usage": _usage(self.started, self.done.usage["completion_tokens"])}
