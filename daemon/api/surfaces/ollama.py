"""Ollama's /api/chat and /api/generate as a surface: messages (tool calls' arguments as
objects), `format`, `think` and `options` become the worker's payload; the typed events
become Ollama's NDJSON lines, and the collected answer is those lines gathered.

Choices where Ollama and mlxd differ: sampling defaults are the model entry's (as on every
route), not Ollama's; `num_predict` -1 and -2 mean "until the context ends"; `num_ctx` is
the window the client needs: above the model's context it is a 400, at or below it the
model's own window serves it (a loaded model's window is not resized per request).
Placement options (num_thread, num_gpu, ...) are mlxd's config's to decide and change no
answer, so they are accepted as the embedding routes accept them; any other option is a 400
naming it. A tool call is sent once its arguments are complete, since Ollama's carry them
as an object. `prompt_eval_count` is the whole prompt, as Ollama's API documents it.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Optional

from quart import Response, jsonify

from ... import events as ev_
from ...lifecycle.handle import ModelUnavailable
from .. import ollama_ttl
from .. import requests as rq
from ..embeddings import HARDWARE_OPTIONS
from ..errors import APIError
from . import Surface, arguments_object, serve
from .payload import check_tools, sampling

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "seed", "num_predict", "stop", "num_ctx")
_UNTIL_CONTEXT_ENDS = 1 << 30          # num_predict -1 / -2: the worker clamps it to the room left


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return int(max(seconds, 0.0) * 1e9)


def options(raw: Optional[dict]) -> dict:
    """The sampling options, checked; a 400 naming every option mlxd has no equivalent for."""
    raw = dict(raw or {})
    unknown = sorted(k for k in raw if k not in SAMPLING_OPTIONS and k not in HARDWARE_OPTIONS)
    if unknown:
        raise APIError(400, f"options {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not supported by "
                            f"mlxd (it takes {', '.join(SAMPLING_OPTIONS)}, and placement options, which its config "
                            "decides)", param="options")

    def bad(key: str, what: str):
        raise APIError(400, f"options.{key} must be {what}, not {json.dumps(raw[key])}", param=f"options.{key}")

    def number(key: str, lo: float, hi: float, lo_open: bool = False) -> Optional[float]:
        v = raw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v > hi or v < lo or (lo_open and v == lo):
            bad(key, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return float(v)

    def whole(key: str) -> Optional[int]:
        v = raw.get(key)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            bad(key, "an integer")
        return v

    out: dict[str, Any] = {"temperature": number("temperature", 0.0, 100.0), "top_p": number("top_p", 0.0, 1.0, True)}
    out["top_k"], out["seed"] = whole("top_k"), whole("seed")
    if out["top_k"] is not None and out["top_k"] < 0:
        bad("top_k", "0 (off) or more")
    n = out["num_predict"] = whole("num_predict")
    if n is not None and n < 1 and n not in (-1, -2):
        bad("num_predict", "at least 1, or -1 / -2 for as many as the context holds")
    stop = raw.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        bad("stop", "a list of non-empty strings")
    out["stop"] = stop or []
    out["num_ctx"] = whole("num_ctx")
    if out["num_ctx"] is not None and out["num_ctx"] < 1:
        bad("num_ctx", "at least 1")
    return out


async def check_window(handle, num_ctx: int) -> None:
    """400 when the client needs a longer window than the model has (loaded to learn it, if need be)."""
    ctx = handle.worker_info.get("context_length") or handle.cfg.engine.context_length
    if ctx is None:
        try:
            await handle.wait_ready(rq.supervisor().config.server.worker_start_timeout)
        except ModelUnavailable as e:
            raise APIError(503, str(e), type_="server_error", code="model_unavailable") from None
        ctx = handle.worker_info.get("context_length")
    if ctx is not None and num_ctx > ctx:
        raise APIError(400, f"options.num_ctx {num_ctx} is more than model '{handle.name}' holds: its context is "
                            f"{ctx} tokens (set engine.context_length in its config entry for more)",
                       param="options.num_ctx")


def _messages(body) -> list[dict]:
    """Ollama's turns in the chat template's shape: calls get ids (Ollama's have none), and a tool
    result answers the earliest unanswered call of its `tool_name` (or the earliest one)."""
    out: list[dict] = []
    unanswered: list[tuple[str, str]] = []
    noise = rq.noise_prefixes()
    n_calls = 0
    for m in body.messages:
        if m.role == "system":
            out.append({"role": "system", "content": rq.drop_noise(m.content, noise)})
        elif m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.thinking:
                msg["reasoning_content"] = m.thinking
            if m.tool_calls:
                msg["tool_calls"] = []
                for c in m.tool_calls:
                    cid, n_calls = c.id or f"call_{n_calls}", n_calls + 1
                    msg["tool_calls"].append({"id": cid, "type": "function", "function": {
                        "name": c.function.name, "arguments": json.dumps(c.function.arguments, ensure_ascii=False)}})
                    unanswered.append((cid, c.function.name))
            out.append(msg)
        elif m.role == "tool":
            msg = {"role": "tool", "content": m.content}
            i = next((i for i, (_, name) in enumerate(unanswered) if m.tool_name in (None, name)), None)
            if i is not None:
                msg["tool_call_id"] = unanswered.pop(i)[0]
            if m.tool_name:
                msg["name"] = m.tool_name
            out.append(msg)
        else:
            out.append({"role": "user", "content": m.content})
    return out


class Ollama(Surface):
    """`kind` "chat" (/api/chat: `message`) or "generate" (/api/generate: `response`)."""
    media_type = "application/x-ndjson"

    def __init__(self, body, handle, kind: str, opts: dict, keep_alive: Optional[float]):
        super().__init__(handle, body.stream)
        self.body, self.kind, self.opts, self.keep_alive = body, kind, opts, keep_alive
        self.sup = rq.supervisor()
        self.t0 = time.perf_counter()
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict] = []
        self.sent_calls = 0
        self.done: Optional[ev_.Done] = None
        self.stats: dict = {}

    @classmethod
    async def run(cls, body, handle, kind: str):
        """Options and keep_alive checked, the model's TTL set, then the shared path."""
        opts = options(body.options)
        keep = ollama_ttl.parse(body.keep_alive)
        rq.check_serves(handle, "chat")
        if opts["num_ctx"] is not None:
            await check_window(handle, opts["num_ctx"])
        surface = cls(body, handle, kind, opts, keep)
        ollama_ttl.before(handle, keep)
        return await serve(surface)

    def finished(self) -> None:
        ollama_ttl.after(self.handle, self.keep_alive, self.sup)

    # -- in --------------------------------------------------------------------------------

    def payload(self) -> dict:
        o, body = self.opts, self.body
        n = o["num_predict"]
        out = sampling(self.handle, _UNTIL_CONTEXT_ENDS if n in (-1, -2) else n, o["temperature"], o["top_p"],
                       o["seed"], o["stop"], o["top_k"])
        if self.kind == "generate" and body.raw:
            out["prompt"] = body.prompt
        elif self.kind == "generate":
            system = rq.drop_noise(body.system or "", rq.noise_prefixes())
            out["messages"] = [*([{"role": "system", "content": system}] if system else []),
                               {"role": "user", "content": body.prompt}]
        else:
            out["messages"] = _messages(body)
            names = [t.function.name for t in body.tools or []]
            check_tools(names)
            if names:
                out["tools"] = [{"type": "function", "function": t.function.model_dump(exclude_none=True)}
                                for t in body.tools]
        if body.format == "json":
            out["response_format"] = {"type": "json_object"}
        elif isinstance(body.format, dict):
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": body.format}}
        if body.think is not None:
            out["chat_template_kwargs"] = {"enable_thinking": body.think is not False}
            if body.think is not False:
                out["require_thinking"] = True      # Ollama answers 400 where the model cannot think
            if isinstance(body.think, str):
                out["reasoning_effort"] = body.think
        return {**out, "surface": f"ollama.{self.kind}"}

    # -- out -------------------------------------------------------------------------------

    def _line(self, content: str = "", thinking: Optional[str] = None, tool_calls: Optional[list] = None,
              done: bool = False) -> dict:
        line: dict[str, Any] = {"model": self.body.model, "created_at": _now()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
        line["done"] = done
        return {**line, **self.stats} if done else line

    def _call(self, i: int) -> dict:
        c = self.calls[i]
        return {"id": c["id"], "function": {"index": i, "name": c["name"], "arguments": arguments_object(c["args"])}}

    def _flush(self):
        """The calls whose arguments are complete, in one line."""
        if self.sent_calls < len(self.calls):
            calls = [self._call(i) for i in range(self.sent_calls, len(self.calls))]
            self.sent_calls = len(self.calls)
            yield self._line(tool_calls=calls)

    def feed(self, ev):
        if isinstance(ev, ev_.ToolCall):
            self.calls.append({"id": ev.call_id, "name": ev.name, "args": ""})
        elif isinstance(ev, ev_.ToolArgs):
            self.calls[ev.index]["args"] += ev.arguments
        elif isinstance(ev, ev_.Text):
            yield from self._flush()
            self.text.append(ev.text)
            yield self._line(ev.text)
        elif isinstance(ev, ev_.Reasoning):
            yield from self._flush()
            self.thinking.append(ev.text)
            yield self._line(thinking=ev.text)
        elif isinstance(ev, ev_.Done):
            yield from self._flush()
            self.done = ev
            self.stats = self._stats(ev)
            yield self._line(done=True)
        # keep-alives (None), progress, started, logprobs: NDJSON has no comments; nothing to send

    def _stats(self, ev: ev_.Done) -> dict:
        total, t, u = time.perf_counter() - self.t0, ev.timings, ev.usage
        worker = t.get("total", 0.0)         # in the worker: queue, prefill, decode
        return {"done_reason": "length" if ev.finish_reason == "length" else "stop",
                "total_duration": _ns(total), "load_duration": _ns(total - worker),
                "prompt_eval_count": u["prompt_tokens"], "prompt_eval_duration": _ns(t.get("prefill", 0.0)),
                "eval_count": u["completion_tokens"], "eval_duration": _ns(worker - t.get("ttft", 0.0))}

    def failed(self, e):
        yield e.ollama_body()

    def encode(self, item) -> bytes:
        return (json.dumps(item, ensure_ascii=False) + "\n").encode()

    def final(self) -> dict:
        calls = [self._call(i) for i in range(len(self.calls))]
        return self._line("".join(self.text), "".join(self.thinking) or None, calls or None, done=True)


async def load_only(handle, body, kind: str):
    """An empty prompt or no messages: load the model (or, with keep_alive 0, unload it), as Ollama does."""
    keep = ollama_ttl.parse(body.keep_alive)
    rq.check_serves(handle, "chat")
    if keep == 0:
        ollama_ttl.after(handle, keep, rq.supervisor())
        reason = "unload"
    else:
        ollama_ttl.before(handle, keep)
        try:
            await handle.wait_ready(rq.supervisor().config.server.worker_start_timeout)
        except ModelUnavailable as e:
            raise APIError(503, str(e), type_="server_error", code="model_unavailable") from None
        reason = "load"
    line = {"model": body.model, "created_at": _now(),
            **({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""}),
            "done_reason": reason, "done": True}
    if body.stream:          # one NDJSON line, as a streamed answer's last
        return Response((json.dumps(line) + "\n").encode(), mimetype=Ollama.media_type)
    return jsonify(line)
