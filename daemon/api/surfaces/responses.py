"""OpenAI's Responses as a surface: input items (after the stored conversation of a
`previous_response_id`) become chat-template messages, the worker's typed events become
output items (reasoning, message, function_call), streamed as the Responses API's semantic
events; the final response is stored for the next turn."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional

from quart import current_app

from ... import events as ev_
from .. import requests as rq
from ..errors import APIError
from . import Surface
from .payload import check_tools, sampling


# -- request -> payload -------------------------------------------------------------------

def _history(body) -> list[dict]:
    """The conversation so far: the previous response's, then this request's items."""
    out: list[dict] = []
    if body.previous_response_id is not None:
        prev = current_app.config["RESPONSES"].get(rq.key_identity(), body.previous_response_id)
        if prev is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        out = [dict(m) for m in prev]
    if isinstance(body.input, str):
        return out + [{"role": "user", "content": body.input}]
    for it in body.input:
        if it.type == "message":
            out.append({"role": "system" if it.role == "developer" else it.role, "content": it.text()})
        elif it.type == "function_call":
            call = {"id": it.call_id, "type": "function", "function": {"name": it.name, "arguments": it.arguments}}
            if out and out[-1]["role"] == "assistant" and not out[-1]["content"] and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif it.type == "function_call_output":
            text = it.output if isinstance(it.output, str) else "".join(p.text for p in it.output)
            out.append({"role": "tool", "tool_call_id": it.call_id, "content": text})
    return out


def _payload(body, handle, history: list[dict]) -> dict:
    messages = list(history)
    if body.instructions and (instructions := rq.drop_noise(body.instructions, rq.noise_prefixes())):
        messages.insert(0, {"role": "system", "content": instructions})
    payload: dict[str, Any] = {"messages": messages,
                               **sampling(handle, body.max_output_tokens, body.temperature, body.top_p)}
    names = [t.name for t in body.tools or []]
    c = body.tool_choice
    named = c is not None and not isinstance(c, str)
    check_tools(names, "required" if c == "required" else None, c.name if named else None, "tool_choice.name")
    if names:
        payload["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                            for t in body.tools]
    if named:
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


class Responses(Surface):
    """POST /v1/responses: one response, its envelope, the conversation it extends, where it is stored."""
    params = {"reasoning_effort": "reasoning.effort"}

    def __init__(self, body, handle):
        super().__init__(handle, body.stream, body.cache_salt)
        self.body, self.owner = body, rq.key_identity()
        self.history = _history(body)
        self.store = current_app.config["RESPONSES"]
        self.id = "resp_" + uuid.uuid4().hex[:24]
        self.out = _Output()
        self.seq = 0
        self.result: Optional[dict] = None
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        choice = body.tool_choice
        self.envelope = {
            "id": self.id, "object": "response", "created_at": int(time.time()), "model": handle.name,
            "status": "in_progress", "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "output": [], "parallel_tool_calls": body.parallel_tool_calls
            is not False, "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store, "temperature": body.temperature, "top_p": body.top_p, "text": {"format": fmt},
            "tool_choice": choice.model_dump() if choice is not None and not isinstance(choice, str)
            else choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "usage": None, "metadata": {}}

    def payload(self) -> dict:
        return {**_payload(self.body, self.handle, self.history), "surface": "responses"}

    def opening(self, run):
        yield "response.created", {"response": self.envelope}
        yield "response.in_progress", {"response": self.envelope}
        if run.started is None:
            yield b": keep-alive\n\n"            # the worker has not answered yet (a load, a grammar)

    def feed(self, ev):
        if ev is None or isinstance(ev, ev_.Progress):
            yield b": waiting\n\n"
        elif isinstance(ev, ev_.Done):
            yield from self.out.finish()
            self.result = self._done(ev)
            yield ("response.incomplete" if self.result["status"] == "incomplete" else "response.completed",
                   {"response": self.result})
        else:
            yield from self.out.add(ev)

    def _done(self, ev: ev_.Done) -> dict:
        incomplete = ev.finish_reason == "length"
        if self.body.store:
            self.store.put(self.owner, self.id, self.history + self.out.messages())
        return {**self.envelope, "status": "incomplete" if incomplete else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "output": self.out.items, "usage": _usage(ev)}

    def failed(self, e):
        yield "error", {"code": e.code, "message": e.message, "param": e.param}
        yield "response.failed", {"response": {**self.envelope, "status": "failed", "error": {
            "code": e.code or e.type, "message": e.message}}}

    def encode(self, item) -> bytes:
        kind, data = item
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': self.seq - 1, **data}, ensure_ascii=False)}\n\n".encode()

    def final(self) -> dict:
        return self.result
