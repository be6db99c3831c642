"""Tool calling: what goes into the prompt, and streaming a call's arguments back out.

A template that knows tools gets them through `apply_chat_template(tools=...)`, and mlx-lm's
parser for it (`TokenizerWrapper.tool_parser`) reads its calls. A template that does not (the
embedded SmolLM2's) gets the fallback: the tools rendered into the system prompt in the
Hermes format, which the model is asked to answer with

    <tool_call>
    {"name": "read", "arguments": {"path": "main.py"}}
    </tool_call>

and mlx-lm's `json_tools` parser reads back. Past calls and tool results are rendered in the
same format, so the model sees its own earlier calls as it wrote them and the prefix cache
finds them again.

Arguments stream while the model writes them: `JsonCall` (json_tools, Hermes, the fallback)
forwards the raw text of the "arguments" value, holding back only what could be the call's
closing brace; `Qwen3CoderCall` turns <parameter=...> blocks into JSON as they grow. Any
other mlx-lm format is parsed whole when its end marker arrives (`WholeCall`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Callable, Optional

log = logging.getLogger("mlxd.worker")

FALLBACK_PARSER = "json_tools"

_FALLBACK_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_reads(tokenizer, name: str, default: bool) -> bool:
    """Whether the chat template mentions the variable `name`; `default` for a custom renderer,
    whose source there is none to read."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = " ".join(map(str, tpl.values()))
    return name in tpl if isinstance(tpl, str) else default


def template_knows_tools(tokenizer) -> bool:
    """Whether the chat template renders `tools` itself (a custom renderer is trusted to)."""
    return template_reads(tokenizer, "tools", bool(tokenizer.has_tool_calling))


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class BadArguments(ValueError):
    """A past call's arguments that are not JSON; `param` names the field."""

    def __init__(self, param: str, error: Exception):
        super().__init__(f"{param} is not valid JSON: {error}")
        self.param = param


def _args_object(arguments: str, where: str):
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError as e:
        raise BadArguments(where, e) from None


def native_messages(messages: list[dict]) -> list[dict]:
    """As mlx_lm.server: call arguments become objects, for templates that iterate them."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _args_object(
                    c["function"]["arguments"], f"messages.{i}.tool_calls.{j}.function.arguments")}}
                for j, c in enumerate(m["tool_calls"])]
        out.append(m)
    return out


def render_call(name: str, arguments: str) -> str:
    """A call as the fallback format writes it; the arguments' text is kept byte for byte."""
    return f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments or "{}"}}}\n</tool_call>'


def fallback_messages(messages: list[dict], tools: Optional[list[dict]]) -> list[dict]:
    """Tools, calls and results in plain system / user / assistant messages."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            for j, c in enumerate(m["tool_calls"]):
                args = c["function"]["arguments"]
                _args_object(args, f"messages.{i}.tool_calls.{j}.function.arguments")
                content += ("\n" if content and not content.endswith("\n") else "") + render_call(
                    c["function"]["name"], args.strip())
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = _FALLBACK_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def merge_system(messages: list[dict]) -> list[dict]:
    """Every system message merged, in order, into one leading one (for templates that insist)."""
    systems = [m["content"] for m in messages if m["role"] == "system" and m.get("content")]
    rest = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(systems)}] if systems else []) + rest


# -- streaming a call's arguments ---------------------------------------------------------

class _Call:
    """One tool block (the text between the start and end markers) -> calls.

    `feed` and `close` return ("name", str) and ("args", str) items; a block may hold
    several calls (a parser that returns a list), each opened by its "name".
    """

    def __init__(self, parser: Callable, tools: Optional[list]):
        self.parser, self.tools = parser, tools
        self.text = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.text += text
        return []

    def close(self) -> list[tuple[str, str]]:
        return self._whole()

    def _whole(self) -> list[tuple[str, str]]:
        try:
            parsed = self.parser(self.text, self.tools)
        except Exception as e:   # a truncated or malformed call
            log.warning("tool call not parsed (%s: %s): %r", type(e).__name__, e, self.text[:200])
            return []
        out = []
        for c in parsed if isinstance(parsed, list) else [parsed]:
            args = c.get("arguments", {})
            out += [("name", c["name"]), ("args", args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))]
        return out


WholeCall = _Call


class JsonCall(_Call):
    _HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')

    def __init__(self, parser, tools):
        super().__init__(parser, tools)
        self.start: Optional[int] = None   # where the arguments value starts in self.text
        self.sent = 0                      # how far into self.text the arguments were sent

    def feed(self, text):
        self.text += text
        out = []
        if self.start is None:
            m = self._HEAD.match(self.text)
            if m is None:
                return out
            try:
                name = json.loads(m.group(1))
            except ValueError:
                name = m.group(1)[1:-1]
            self.start = self.sent = m.end()
            out.append(("name", name))
        if self.sent == self.start:          # the value's first character decides how it is sent
            while self.start < len(self.text) and self.text[self.start].isspace():
                self.start = self.sent = self.start + 1
            if self.start == len(self.text) or self.text[self.start] == '"':
                return out                   # not begun, or a JSON string holding the arguments: whole at the end
        end = _tail_start(self.text)
        if end > self.sent:
            out.append(("args", self.text[self.sent:end]))
            self.sent = end
        return out

    def close(self):
        if self.start is None:
            return self._whole()
        value = self.text[self.start:_tail_start(self.text)]
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
            return [("args", value)]
        return [("args", self.text[self.sent:self.start + len(value)])] if self.start + len(value) > self.sent else []


def _tail_start(s: str) -> int:
    """Where the trailing whitespace, `}`, whitespace of `s` begins: what could still be the call's end."""
    i = len(s)
    while i and s[i - 1].isspace():
        i -= 1
    if i and s[i - 1] == "}":
        i -= 1
        while i and s[i - 1].isspace():
            i -= 1
    return i


class Qwen3CoderCall(_Call):
    """<function=NAME> <parameter=P>VALUE</parameter>... -> a JSON object, string values streamed."""

    _END_PARAM = "</parameter>"

    def __init__(self, parser, tools):
        super().__init__(parser, tools)
        self.pos = 0
        self.name: Optional[str] = None
        self.param: Optional[str] = None
        self.streaming = False        # inside a string value being streamed
        self.value_started = False
        self.params = 0
        self.closed = False

    def _config(self) -> dict:
        from mlx_lm.tool_parsers.qwen3_coder import _get_arguments_config
        try:
            conf = _get_arguments_config(self.name, self.tools)
        except (AttributeError, TypeError):   # a client's odd schema: no types known
            return {}
        return conf if isinstance(conf, dict) else {}

    def _value(self, text: str) -> str:
        """A non-string parameter as JSON, converted as mlx-lm's parser does (its text if that fails)."""
        from mlx_lm.tool_parsers.qwen3_coder import _convert_param_value
        try:
            value = _convert_param_value(text, self.param, self._config())
        except (ValueError, TypeError, AttributeError):
            value = text
        return json.dumps(value, ensure_ascii=False)

    def _is_string(self, param: str) -> bool:
        conf = self._config().get(param)
        if not isinstance(conf, dict) or not conf:
            return True              # mlx-lm keeps the text of an undeclared parameter
        return "type" in conf and str(conf["type"]).strip().lower() in {"string", "str", "text", "varchar", "char", "enum"}

    def feed(self, text):
        self.text += text
        out: list[tuple[str, str]] = []
        while not self.closed:
            rest = self.text[self.pos:]
            if self.name is None:
                m = re.search(r"<function=([^>\s]+)>", rest)
                if m is None:
                    return out
                self.name, self.pos = m.group(1), self.pos + m.end()
                out.append(("name", self.name))
            elif self.param is None:
                m = re.search(r"<parameter=([^>\s]+)>|</function>", rest)
                if m is None:
                    return out
                self.pos += m.end()
                if m.group(1) is None:
                    out.append(("args", "}" if self.params else "{}"))
                    self.closed = True
                    return out
                self.param = m.group(1)
                out.append(("args", ("{" if not self.params else ", ") + json.dumps(self.param, ensure_ascii=False) + ": "))
                self.params += 1
                self.streaming, self.value_started = self._is_string(self.param), False
                if self.streaming:
                    out.append(("args", '"'))
            else:
                end = rest.find(self._END_PARAM)
                if not self.value_started:
                    if not rest:
                        return out
                    if rest.startswith("\n"):
                        self.pos += 1
                        rest = rest[1:]
                        end = end - 1 if end > 0 else end
                    self.value_started = True
                if end < 0:
                    if self.streaming:
                        safe = len(rest) - _held(rest, "\n" + self._END_PARAM)
                        if safe:
                            out.append(("args", _json_chars(rest[:safe])))
                            self.pos += safe
                    return out
                value = rest[:end]
                value = value[:-1] if value.endswith("\n") else value
                out.append(("args", _json_chars(value) + '"' if self.streaming else self._value(value)))
                self.pos += end + len(self._END_PARAM)
                self.param = None
        return out

    def close(self):
        if self.name is None:
            return self._whole()
        if self.closed:
            return []
        out = []
        if self.param is not None:        # cut short: close what was open
            rest = self.text[self.pos:]
            out.append(("args", _json_chars(rest) + '"' if self.streaming else self._value(rest.strip("\n"))))
            self.param = None
        out.append(("args", "}" if self.params else "{}"))
        self.closed = True
        return out


def _held(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a start of `marker`."""
    for n in range(min(len(text), len(marker)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _json_chars(s: str) -> str:
    """`s` escaped as inside a JSON string: per character, so pieces concatenate."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


STREAMING = {"json_tools": JsonCall, "qwen3_coder": Qwen3CoderCall}


def call_class(parser_name: Optional[str]) -> type[_Call]:
    return STREAMING.get(parser_name or "", WholeCall)


def parser_name(tokenizer) -> Optional[str]:
    p = tokenizer.tool_parser
    return p.__module__.rsplit(".", 1)[-1] if p is not None else None


def tool_names(tools: Optional[list[dict]]) -> list[str]:
    return [t["function"]["name"] for t in tools or [] if t.get("type") == "function"]

