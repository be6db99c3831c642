"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

Claude Code and other Anthropic clients (`ANTHROPIC_BASE_URL`) reach the same request path
as the OpenAI routes: the request becomes the worker's payload (messages in the chat
template's shape, tools as functions, `tool_choice` in OpenAI's forms so grammar enforces
`any` and `tool`), and the worker's typed events become content blocks. Streams send
`event: ping` while a long prefill runs: these clients ignore SSE comments. A stream that
waits longer than a ping's period for the worker (a model's load, a grammar compile) sends
`message_start` and a ping at once; its prompt's usage then comes in `message_delta`,
which always carries the full usage (cumulative, as Anthropic's does).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from pydantic import BaseModel, Field, model_validator
from quart import Blueprint, jsonify

from .. import events as ev_
from . import requests as rq
from .errors import APIError
from .openai import sse_response
from .schemas import STRICT, Count, tagged

bp = Blueprint("anthropic", __name__)


# -- the request --------------------------------------------------------------------------

class TextBlock(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[TextBlock]] = ""
    is_error: bool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(BaseModel):
    model_config = STRICT
    type: Literal["thinking", "redacted_thinking"]
    thinking: str = ""


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock], tagged(
    {"text": TextBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock, "thinking": ThinkingBlock,
     "redacted_thinking": ThinkingBlock}, "content blocks")]


class MessageIn(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[Block]]


class ToolIn(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: Optional[str] = None
    input_schema: dict[str, Any] = Field(description="A JSON Schema object.")
    type: Optional[Literal["custom"]] = Field(None, description="Only client (custom) tools; server tools are not run here.")


class ToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None

    @model_validator(mode="after")
    def _named(self):
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs 'name'")
        return self


class Thinking(BaseModel):
    model_config = STRICT
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: Optional[Count] = Field(None, ge=1)


class OutputFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = STRICT
    effort: Optional[Literal["low", "medium", "high", "max"]] = Field(None, description="Passed to the chat template.")
    format: Optional[OutputFormat] = Field(None, description="Structured output, enforced by grammar.")


class CountTokensRequest(BaseModel):
    model_config = STRICT
    model: str = Field(min_length=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: Optional[Union[str, list[TextBlock]]] = None
    tools: Optional[list[ToolIn]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Count = Field(ge=1)
    stop_sequences: Optional[list[str]] = Field(None, max_length=16)
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[Count] = Field(None, ge=1)
    stream: bool = False
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256, description=(
        "Requests reuse only cached prefixes of requests with the same salt (and, with API keys, the same key)."))


# -- request -> payload -------------------------------------------------------------------

def _system_text(system) -> str:
    if system is None:
        return ""
    blocks = [system] if isinstance(system, str) else [b.text for b in system]
    noise = rq.noise_prefixes()
    return "\n\n".join(t for t in (rq.drop_noise(b, noise) for b in blocks) if t)


def _messages(body: CountTokensRequest) -> list[dict]:
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
                if isinstance(b, TextBlock):
                    msg["content"] += b.text
                elif isinstance(b, ThinkingBlock):
                    msg["reasoning_content"] = msg.get("reasoning_content", "") + b.thinking
                elif isinstance(b, ToolUseBlock):
                    msg.setdefault("tool_calls", []).append({"id": b.id, "type": "function", "function": {
                        "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
                else:
                    raise APIError(400, "an assistant message cannot carry tool_result blocks",
                                   param=f"messages.{i}.content.{j}")
            out.append(msg)
            continue
        text: list[str] = []
        for j, b in enumerate(m.content):
            if isinstance(b, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()})
            elif isinstance(b, TextBlock):
                text.append(b.text)
            else:
                raise APIError(400, f"a {m.role} message cannot carry {b.type} blocks", param=f"messages.{i}.content.{j}")
        if text:
            out.append(said(m.role, "".join(text)))
    return out


def _tool_payload(body: CountTokensRequest) -> dict:
    """Tools as OpenAI functions; `tool_choice` in OpenAI's forms (grammar enforces any/tool)."""
    out: dict[str, Any] = {}
    names = [t.name for t in body.tools or []]
    if len(set(names)) < len(names):
        raise APIError(400, "two tools have the same name", param="tools")
    if names:
        out["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            "parameters": t.input_schema}} for t in body.tools]
    c = body.tool_choice
    if c is not None:
        if c.type in ("any", "tool") and not names:
            raise APIError(400, f"tool_choice '{c.type}' needs 'tools'", param="tool_choice")
        if c.type == "tool" and c.name not in names:
            raise APIError(400, f"tool_choice names {c.name!r}, which is not in 'tools'", param="tool_choice.name")
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


def _payload(body: CountTokensRequest, handle) -> dict:
    payload = {"messages": _messages(body), **_tool_payload(body)}
    if isinstance(body, MessagesRequest):
        s = handle.cfg.sampling
        payload.update(max_tokens=body.max_tokens, stop=list(body.stop_sequences or []), seed=None,
                       temperature=s.temperature if body.temperature is None else body.temperature,
                       top_p=s.top_p if body.top_p is None else body.top_p)
        if body.top_k:
            payload["top_k"] = body.top_k
    return payload


# -- events -> content blocks -------------------------------------------------------------

def _usage(started: ev_.Started, output_tokens: int) -> dict:
    """Anthropic counts cached prompt tokens apart from `input_tokens`."""
    return {"input_tokens": started.prompt_tokens - started.cached_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": started.cached_tokens, "cache_creation_input_tokens": 0}


def _stop(done: ev_.Done, stops: list[str]) -> tuple[str, Optional[str]]:
    if done.finish_reason == "tool_calls":
        return "tool_use", None
    if done.finish_reason == "length":
        return "max_tokens", None
    if done.stop_sequence is not None and done.stop_sequence in stops:
        return "stop_sequence", done.stop_sequence
    return "end_turn", None


def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _collect(run: rq.Run, meta: dict, stops: list[str]):
    blocks: list[dict] = []
    args: dict[int, str] = {}
    calls: dict[int, dict] = {}

    def block(kind: str, field: str, text: str):
        if blocks and blocks[-1]["type"] == kind:
            blocks[-1][field] += text
        else:
            blocks.append({"type": kind, field: text, **({"signature": ""} if kind == "thinking" else {})})

    async with contextlib.aclosing(run.events):
        async for ev in run.events:
            if isinstance(ev, ev_.Text):
                block("text", "text", ev.text)
            elif isinstance(ev, ev_.Reasoning):
                block("thinking", "thinking", ev.text)
            elif isinstance(ev, ev_.ToolCall):
                calls[ev.index] = {"type": "tool_use", "id": ev.call_id, "name": ev.name, "input": {}}
                blocks.append(calls[ev.index])
                args[ev.index] = ""
            elif isinstance(ev, ev_.ToolArgs):
                args[ev.index] += ev.arguments
            elif isinstance(ev, ev_.Done):
                break
    for i, call in calls.items():
        call["input"] = _input(args[i])
    reason, seq = _stop(ev, stops)
    return jsonify({**meta, "content": blocks, "stop_reason": reason, "stop_sequence": seq,
                    "usage": _usage(run.started, ev.usage["completion_tokens"])})


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n".encode()


async def _stream(run: rq.Run, meta: dict, stops: list[str]) -> AsyncIterator[bytes]:
    started = run.started or ev_.Started(id="", prompt_tokens=0, cached_tokens=0, max_tokens=0)
    yield _event("message_start", {"message": {**meta, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": _usage(started, 0)}})
    if run.started is None:
        yield _event("ping", {})           # the worker has not answered yet (a load, a grammar)
    index, open_kind, open_call = -1, None, None

    def close():
        return _event("content_block_stop", {"index": index}) if open_kind else b""

    try:
        async for ev in run.events:
            if ev is None or isinstance(ev, ev_.Progress):
                yield _event("ping", {})
            elif isinstance(ev, ev_.Started):
                started = ev
            elif isinstance(ev, (ev_.Text, ev_.Reasoning)):
                kind = "text" if isinstance(ev, ev_.Text) else "thinking"
                if open_kind != kind:
                    yield close()
                    index, open_kind = index + 1, kind
                    start = {"type": "text", "text": ""} if kind == "text" else \
                        {"type": "thinking", "thinking": "", "signature": ""}
                    yield _event("content_block_start", {"index": index, "content_block": start})
                delta = {"type": "text_delta", "text": ev.text} if kind == "text" else \
                    {"type": "thinking_delta", "thinking": ev.text}
                yield _event("content_block_delta", {"index": index, "delta": delta})
            elif isinstance(ev, ev_.ToolCall):
                yield close()
                index, open_kind, open_call = index + 1, "tool_use", ev.index
                yield _event("content_block_start", {"index": index, "content_block": {
                    "type": "tool_use", "id": ev.call_id, "name": ev.name, "input": {}}})
            elif isinstance(ev, ev_.ToolArgs) and ev.index == open_call and open_kind == "tool_use":
                yield _event("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": ev.arguments}})
            elif isinstance(ev, ev_.Done):
                yield close()
                reason, seq = _stop(ev, stops)
                yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq},
                                               "usage": _usage(started, ev.usage["completion_tokens"])})
                yield _event("message_stop", {})
                return
    except APIError as e:
        yield _event("error", {"error": e.anthropic_body()["error"]})


# -- routes -------------------------------------------------------------------------------

@bp.post("/v1/messages")
async def messages():
    rq.check_open()
    body = await rq.body(MessagesRequest)
    handle = rq.model(body.model)
    run = await rq.start(handle, {**_payload(body, handle), "surface": "messages"}, body.cache_salt,
                         stream=body.stream)
    meta = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": handle.name}
    stops = list(body.stop_sequences or [])
    if body.stream:
        return sse_response(_stream(run, meta, stops))
    return await _collect(run, meta, stops)


@bp.post("/v1/messages/count_tokens")
async def count_tokens():
    rq.check_open()
    body = await rq.body(CountTokensRequest)
    handle = rq.model(body.model)
    return jsonify({"input_tokens": await rq.count_tokens(handle, _payload(body, handle))})
