"""OpenAI's Chat Completions and Completions as a surface: the body becomes the worker's
payload unchanged but for the model's defaults; each typed event is one chunk delta, and
the collected message is those deltas gathered."""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from ... import events as ev_
from ..schemas import NamedToolChoice
from . import Surface
from .payload import check_tools, sampling


def usage(done: ev_.Done) -> dict:
    u = done.usage
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}


def logprob(ev: ev_.Logprob) -> dict:
    def entry(token, lp):
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return {**entry(ev.token, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top]}


class Chat(Surface):
    """`kind` "chat" (/v1/chat/completions) or "completion" (/v1/completions)."""

    def __init__(self, body, handle, kind: str):
        super().__init__(handle, body.stream, body.cache_salt)
        self.body, self.kind = body, kind
        self.chat = kind == "chat"
        self.meta = {"id": ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24],
                     "created": int(time.time()), "model": handle.name}
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []
        self.logprobs: list[dict] = []
        self.done: Optional[ev_.Done] = None

    def payload(self) -> dict:
        body = self.body
        out = sampling(self.handle, getattr(body, "max_completion_tokens", None) or body.max_tokens,
                       body.temperature, body.top_p, body.seed, body.stop_list())
        if not self.chat:
            return {**out, "prompt": body.prompt}
        choice = body.tool_choice
        check_tools([t.function.name for t in body.tools or []], "required" if choice == "required" else None,
                    choice.function.name if isinstance(choice, NamedToolChoice) else None)
        return {**out, "messages": body.template_messages(), **body.tool_payload()}

    def _chunk(self, delta: dict, finish=None, logprobs=None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        return {**self.meta, "object": self.object, "choices": [choice]}

    def opening(self, run):
        if run.started is None:
            yield b": keep-alive\n\n"            # the worker has not answered yet (a load, a grammar, a queue)
        if self.chat:
            yield self._chunk({"role": "assistant", "content": ""})

    def feed(self, ev):
        """A call's id and name come in its first chunk, then its arguments."""
        if ev is None:
            yield b": waiting\n\n"
        elif isinstance(ev, ev_.Text):
            self.text.append(ev.text)
            yield self._chunk({"content": ev.text})
        elif isinstance(ev, ev_.Reasoning):
            self.reasoning.append(ev.text)
            yield self._chunk({"reasoning_content": ev.text, "reasoning": ev.text})
        elif isinstance(ev, ev_.ToolCall):
            self.calls.append({"id": ev.call_id, "type": "function", "function": {"name": ev.name, "arguments": ""}})
            yield self._chunk({"tool_calls": [{"index": ev.index, "id": ev.call_id, "type": "function",
                                               "function": {"name": ev.name, "arguments": ""}}]})
        elif isinstance(ev, ev_.ToolArgs):
            self.calls[ev.index]["function"]["arguments"] += ev.arguments
            yield self._chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]})
        elif isinstance(ev, ev_.Logprob):
            lp = logprob(ev)
            self.logprobs.append(lp)
            yield self._chunk({}, logprobs={"content": [lp], "refusal": None})
        elif isinstance(ev, ev_.Progress):
            yield f": prefill {ev.done}/{ev.total}\n\n".encode()
        elif isinstance(ev, ev_.Done):
            self.done = ev
            yield self._chunk({}, finish=ev.finish_reason)
            if self.include_usage:
                yield {**self.meta, "object": self.object, "choices": [], "usage": usage(ev)}
            yield b"data: [DONE]\n\n"

    def failed(self, e):
        yield e.body()

    def encode(self, item) -> bytes:
        return f"data: {json.dumps(item, ensure_ascii=False)}\n\n".encode()

    def final(self) -> dict:
        ev, content = self.done, "".join(self.text)
        if not self.chat:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": ev.finish_reason}
            return {**self.meta, "object": "text_completion", "choices": [choice], "usage": usage(ev)}
        message = {"role": "assistant", "content": content or (None if self.calls else ""), "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = message["reasoning"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = self.calls
        choice = {"index": 0, "message": message, "finish_reason": ev.finish_reason,
                  "logprobs": {"content": self.logprobs, "refusal": None} if self.logprobs else None}
        return {**self.meta, "object": "chat.completion", "choices": [choice], "usage": usage(ev)}
