"""OpenAI's Responses API: POST /v1/responses, for Codex and newer OpenAI SDK code.

Stateless but for `previous_response_id`: the conversation of this daemon's recent
responses is kept in a bounded in-memory store (`server.responses_store` entries), so a
follow-up sends only its new items; with API keys, each key's responses are its own. Input items become chat-template messages, the worker's
typed events become output items (reasoning, message, function_call), streamed as the
Responses API's semantic events.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Optional, Union

from pydantic import BaseModel, Field, model_validator
from quart import Blueprint, current_app, jsonify

from .. import events as ev_
from . import requests as rq
from .errors import APIError
from .openai import sse_response
from .schemas import STRICT, Count, FunctionDef, tagged

bp = Blueprint("responses", __name__)


class Store:
    """The last N responses' conversations, oldest dropped first; N read live from the config.
    Keyed by (owner, id): another key's response is as absent as an unknown one."""

    def __init__(self, size: Callable[[], int]):
        self.size, self.items = size, OrderedDict()

    def get(self, owner: str, rid: str) -> Optional[list[dict]]:
        return self.items.get((owner, rid))

    def put(self, owner: str, rid: str, messages: list[dict]) -> None:
        self.items[(owner, rid)] = messages
        while len(self.items) > max(self.size(), 0):
            self.items.popitem(last=False)


# -- the request --------------------------------------------------------------------------

class InputText(BaseModel):
    model_config = STRICT
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[InputText]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = STRICT
    type: Literal["function_call"]
    call_id: str
    name: str = Field(min_length=1)
    arguments: str


class FunctionOutputItem(BaseModel):
    model_config = STRICT
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[InputText]]


class ReasoningItem(BaseModel):
    """Reasoning sent back: accepted; templates drop earlier turns' reasoning."""
    model_config = STRICT
    type: Literal["reasoning"]


Item = Annotated[Union[InputMessage, FunctionCallItem, FunctionOutputItem, ReasoningItem], tagged(
    {"message": InputMessage, "function_call": FunctionCallItem, "function_call_output": FunctionOutputItem,
     "reasoning": ReasoningItem}, "input items", default="message")]


class FunctionTool(FunctionDef):
    """Chat's function definition, flattened into the tool as the Responses API has it."""
    type: Literal["function"]


class NamedFunction(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = {**STRICT, "populate_by_name": True}
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("type 'json_schema' needs 'name' and 'schema'")
        return self


class TextOptions(BaseModel):
    model_config = STRICT
    format: Optional[TextFormat] = None


class Reasoning(BaseModel):
    model_config = STRICT
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None


class ResponsesRequest(BaseModel):
    model_config = STRICT
    model: str = Field(min_length=1)
    input: Union[str, list[Item]]
    instructions: Optional[str] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedFunction]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextOptions] = None
    max_output_tokens: Optional[Count] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    reasoning: Optional[Reasoning] = None
    store: bool = True
    previous_response_id: Optional[str] = None
    stream: bool = False
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256, description=(
        "Requests reuse only cached prefixes of requests with the same salt (and, with API keys, the same key)."))


# -- request -> payload -------------------------------------------------------------------

def _history(body: ResponsesRequest) -> list[dict]:
    """The conversation so far: the previous response's, then this request's items."""
    out: list[dict] = []
    if body.previous_response_id is not None:
        prev = current_app.config["RESPONSES"].get(rq.key_identity(), body.previous_response_id)
        if prev is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        out = [dict(m) for m in prev]
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for it in items:
        if isinstance(it, InputMessage):
            out.append({"role": "system" if it.role == "developer" else it.role, "content": it.text()})
        elif isinstance(it, FunctionCallItem):
            call = {"id": it.call_id, "type": "function", "function": {"name": it.name, "arguments": it.arguments}}
            if out and out[-1]["role"] == "assistant" and not out[-1]["content"] and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(it, FunctionOutputItem):
            text = it.output if isinstance(it.output, str) else "".join(p.text for p in it.output)
            out.append({"role": "tool", "tool_call_id": it.call_id, "content": text})
    return out


def _payload(body: ResponsesRequest, handle, history: list[dict]) -> dict:
    s = handle.cfg.sampling
    messages = list(history)
    if body.instructions and (instructions := rq.drop_noise(body.instructions, rq.noise_prefixes())):
        messages.insert(0, {"role": "system", "content": instructions})
    payload: dict[str, Any] = {
        "messages": messages, "max_tokens": body.max_output_tokens or s.max_tokens, "stop": [], "seed": None,
        "temperature": s.temperature if body.temperature is None else body.temperature,
        "top_p": s.top_p if body.top_p is None else body.top_p}
    names = [t.name for t in body.tools or []]
    if len(set(names)) < len(names):
        raise APIError(400, "two tools have the same name", param="tools")
    if names:
        payload["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                            for t in body.tools]
    c = body.tool_choice
    if c == "required" and not names:
        raise APIError(400, "tool_choice 'required' needs 'tools'", param="tool_choice")
    if isinstance(c, NamedFunction):
        if c.name not in names:
            raise APIError(400, f"tool_choice names {c.name!r}, which is not in 'tools'", param="tool_choice.name")
        payload["tool_choice"] = {"type": "function", "function": {"name": c.name}}
    elif c is not None:
        payload["tool_choice"] = c
    if body.parallel_tool_calls is not None:
        payload["parallel_tool_calls"] = body.parallel_tool_calls
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        payload["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
            by_alias=True, exclude={"type"}, exclude_none=True)}
    elif fmt is not None and fmt.type == "json_object":
        payload["response_format"] = {"type": "json_object"}
    if body.reasoning and body.reasoning.effort:
        payload["reasoning_effort"] = body.reasoning.effort
        if body.reasoning.effort == "none":
            payload["chat_template_kwargs"] = {"enable_thinking": False}
    return payload


# -- events -> output items ---------------------------------------------------------------

class _Output:
    """The response being built: output items in order, as the events arrive."""

    def __init__(self):
        self.items: list[dict] = []
        self.calls: dict[int, int] = {}     # tool-call index -> output index

    def add(self, ev) -> list[tuple[str, dict]]:
        """The stream events for one worker event (added items, deltas)."""
        out = []
        last = self.items[-1] if self.items else None
        if isinstance(ev, (ev_.Text, ev_.Reasoning)):
            kind = "message" if isinstance(ev, ev_.Text) else "reasoning"
            if last is None or last["type"] != kind:
                out += self._open(kind)
                last = self.items[-1]
            i = len(self.items) - 1
            last["content"][0]["text"] += ev.text
            name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
            out.append((name, {"item_id": last["id"], "output_index": i, "content_index": 0, "delta": ev.text,
                               **({"logprobs": []} if kind == "message" else {})}))
        elif isinstance(ev, ev_.ToolCall):
            item = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24], "call_id": ev.call_id,
                    "name": ev.name, "arguments": "", "status": "in_progress"}
            self.items.append(item)
            self.calls[ev.index] = len(self.items) - 1
            out.append(("response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(item)}))
        elif isinstance(ev, ev_.ToolArgs):
            i = self.calls[ev.index]
            self.items[i]["arguments"] += ev.arguments
            out.append(("response.function_call_arguments.delta",
                        {"item_id": self.items[i]["id"], "output_index": i, "delta": ev.arguments}))
        return out

    def _open(self, kind: str) -> list[tuple[str, dict]]:
        if kind == "message":
            item = {"type": "message", "id": "msg_" + uuid.uuid4().hex[:24], "status": "in_progress",
                    "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex[:24], "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        self.items.append(item)
        i = len(self.items) - 1
        events = [("response.output_item.added", {"output_index": i, "item": json.loads(json.dumps(item))})]
        item["content"].append(part)
        events.append(("response.content_part.added", {"item_id": item["id"], "output_index": i,
                                                        "content_index": 0, "part": dict(part)}))
        return events

    def finish(self) -> list[tuple[str, dict]]:
        out = []
        for i, item in enumerate(self.items):
            item["status"] = "completed"
            if item["type"] == "function_call":
                out.append(("response.function_call_arguments.done",
                            {"item_id": item["id"], "output_index": i, "arguments": item["arguments"]}))
            else:
                part = item["content"][0]
                if item["type"] == "message":
                    out.append(("response.output_text.done", {"item_id": item["id"], "output_index": i,
                                                              "content_index": 0, "text": part["text"], "logprobs": []}))
                else:
                    out.append(("response.reasoning_text.done", {"item_id": item["id"], "output_index": i,
                                                                 "content_index": 0, "text": part["text"]}))
                out.append(("response.content_part.done", {"item_id": item["id"], "output_index": i,
                                                           "content_index": 0, "part": part}))
            out.append(("response.output_item.done", {"output_index": i, "item": item}))
        return out

    def messages(self) -> list[dict]:
        """The output as template messages, for the next turn's previous_response_id."""
        msg: dict[str, Any] = {"role": "assistant", "content": ""}
        for item in self.items:
            if item["type"] == "message":
                msg["content"] += item["content"][0]["text"]
            elif item["type"] == "function_call":
                msg.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                    "name": item["name"], "arguments": item["arguments"]}})
        return [msg]


def _usage(done: ev_.Done) -> dict:
    u = done.usage
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": u["cached_tokens"]},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


class _Turn:
    """One response: its envelope, the conversation it extends, and where it is stored."""

    def __init__(self, body: ResponsesRequest, handle, history: list[dict]):
        self.body, self.history, self.owner = body, history, rq.key_identity()
        self.id = "resp_" + uuid.uuid4().hex[:24]
        self.out = _Output()
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        self.envelope = {
            "id": self.id, "object": "response", "created_at": int(time.time()), "model": handle.name,
            "status": "in_progress", "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "output": [], "parallel_tool_calls": body.parallel_tool_calls
            is not False, "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store, "temperature": body.temperature, "top_p": body.top_p, "text": {"format": fmt},
            "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel)
            else body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "usage": None, "metadata": {}}

    def done(self, ev: ev_.Done, store) -> dict:
        incomplete = ev.finish_reason == "length"
        if self.body.store:
            store.put(self.owner, self.id, self.history + self.out.messages())
        return {**self.envelope, "status": "incomplete" if incomplete else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "output": self.out.items, "usage": _usage(ev)}


async def _collect(turn: _Turn, run: rq.Run, store):
    async with contextlib.aclosing(run.events):
        async for ev in run.events:
            if isinstance(ev, ev_.Done):
                break
            turn.out.add(ev)
    turn.out.finish()
    return jsonify(turn.done(ev, store))


async def _stream(turn: _Turn, run: rq.Run, store) -> AsyncIterator[bytes]:
    seq = 0

    def event(kind: str, data: dict) -> bytes:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **data}, ensure_ascii=False)}\n\n".encode()

    yield event("response.created", {"response": turn.envelope})
    yield event("response.in_progress", {"response": turn.envelope})
    if run.started is None:
        yield b": keep-alive\n\n"            # the worker has not answered yet (a load, a grammar)
    try:
        async for ev in run.events:
            if ev is None or isinstance(ev, ev_.Progress):
                yield b": waiting\n\n"
            elif isinstance(ev, ev_.Done):
                for kind, data in turn.out.finish():
                    yield event(kind, data)
                final = turn.done(ev, store)
                yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                            {"response": final})
                return
            else:
                for kind, data in turn.out.add(ev):
                    yield event(kind, data)
    except APIError as e:
        yield event("error", {"code": e.code, "message": e.message, "param": e.param})
        yield event("response.failed", {"response": {**turn.envelope, "status": "failed", "error": {
            "code": e.code or e.type, "message": e.message}}})


@bp.post("/v1/responses")
async def responses():
    rq.check_open()
    body = await rq.body(ResponsesRequest)
    handle = rq.model(body.model)
    history = _history(body)
    turn = _Turn(body, handle, history)
    run = await rq.start(handle, {**_payload(body, handle, history), "surface": "responses"}, body.cache_salt,
                         stream=body.stream)
    store = current_app.config["RESPONSES"]
    if body.stream:
        return sse_response(_stream(turn, run, store))
    return await _collect(turn, run, store)
