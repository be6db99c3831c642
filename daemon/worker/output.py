"""One request's generated tokens -> typed events: text, reasoning, tool calls.

Tokens are detokenized (`TextStream`, which also cuts at `stop` strings), then segmented by
mlx-lm's `TextStateMachine` into normal text, reasoning and tool-call blocks, with markers
stripped and partial markers held back, so no `<think>` or `<tool_call>` ever reaches
`content`. A tool block's text goes to its format's call parser (`tools.py`), which streams
the call's name, then its arguments as they are written.

The machine is mlx-lm's `make_text_state_machine`, given the markers this model uses: the
tokenizer's own, or those set by the model's config (`reasoning_parser`, `tool_parser`) or
the fallback tool format.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from ..events import Reasoning, Text, ToolArgs, ToolCall
from .textstream import TextStream
from .tools import WholeCall, new_call_id

THINK = ("<think>", "</think>")


@dataclass(frozen=True)
class Markers:
    think: Optional[tuple[str, str]] = None
    tool: Optional[tuple[str, Optional[str]]] = None


def state_machine(tokenizer, markers: Markers) -> TextStateMachine:
    """mlx-lm's machine for these markers, with the tokenizer's own response format kept."""
    view = SimpleNamespace(
        has_thinking=markers.think is not None,
        think_start=markers.think and markers.think[0], think_end=markers.think and markers.think[1],
        has_tool_calling=markers.tool is not None,
        tool_call_start=markers.tool and markers.tool[0], tool_call_end=markers.tool and markers.tool[1],
        response_transitions=tokenizer.response_transitions, structural_markers=tokenizer.structural_markers)
    return make_text_state_machine(view)


def initial_state(tokenizer, markers: Markers, prompt_text: str) -> str:
    """Reasoning when the prompt opened a think block it did not close (as mlx_lm.server)."""
    if markers.think and prompt_text.rfind(markers.think[0]) > prompt_text.rfind(markers.think[1]):
        return "reasoning"
    return tokenizer.response_initial_state or "normal"


class Output:
    def __init__(self, rid: str, detokenizer, stop: list[str], machine: Optional[TextStateMachine] = None,
                 initial: str = "normal", call_class=WholeCall, parser=None, tools=None, parallel: bool = True):
        self.rid = rid
        self.text = TextStream(detokenizer, stop)
        self.sm = machine.make_state(initial) if machine is not None else None
        self.cur = initial
        self.call_class, self.parser, self.tools, self.parallel = call_class, parser, tools, parallel
        self.call = None
        self.calls = 0
        self._opened_at = 0       # calls made before the open tool block
        self._skip = False        # a second call when parallel_tool_calls is false
        self._ended = False       # the machine reached a final state, or the one allowed call closed
        self._space = ""          # whitespace after a call, sent only if text follows

    @property
    def stopped(self) -> bool:
        return self.text.stopped or self._ended

    def add(self, token: int) -> list:
        return self._route(self.text.add(token))

    def finish(self, reason: str) -> tuple[list, str]:
        """The last events, and the finish reason (`tool_calls` when a call ended the answer)."""
        events = self._route(self.text.finish())
        if self.sm is not None:
            # What the machine still holds could only be the start of a marker: never content.
            self.sm, _ = TextStateMachine.discard(self.sm)
            if self.call is not None:
                events += self._close_call()
        if self.calls and reason == "stop":
            reason = "tool_calls"
        return events, reason

    def _route(self, text: str) -> list:
        if not text or self._ended:
            return []
        if self.sm is None:
            return [Text(self.rid, text)]
        self.sm, segments = TextStateMachine.split(self.sm, text)
        events = []
        for state, chunk in segments:
            if state != self.cur:
                if self.call is not None:
                    events += self._close_call()
                if state == "tool":
                    self.call, self._opened_at = self.call_class(self.parser, self.tools), self.calls
                self.cur = state
                if state is None:
                    self._ended = True
            if self._ended:
                break
            events += self._emit(state, chunk)
        return events

    def _emit(self, state, chunk: str) -> list:
        if not chunk:
            return []
        if state == "reasoning":
            return [Reasoning(self.rid, chunk)]
        if state == "tool" and self.call is not None:
            return self._call_events(self.call.feed(chunk))
        if self.calls and not (self._space + chunk).strip():
            self._space += chunk
            return []
        chunk, self._space = self._space + chunk, ""
        return [Text(self.rid, chunk)]

    def _close_call(self) -> list:
        call, self.call = self.call, None
        events = self._call_events(call.close())
        if self.calls == self._opened_at and call.text.strip():   # not a call after all: keep the words, not the markup
            events.append(Text(self.rid, call.text.strip()))
        if self.calls and not self.parallel:
            self._ended = True
        return events

    def _call_events(self, items) -> list:
        events = []
        for kind, value in items:
            if kind == "name":
                self._skip = self.calls > 0 and not self.parallel
                if not self._skip:
                    events.append(ToolCall(self.rid, self.calls, new_call_id(), value))
                    self.calls += 1
            elif value and not self._skip:
                events.append(ToolArgs(self.rid, self.calls - 1, value))
        return events
