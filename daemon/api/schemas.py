"""Request bodies of the OpenAI routes, validated by pydantic.

Unknown fields are accepted and ignored, as clients send many (user, n=1, metadata);
fields we accept are checked strictly (no "8" for 8, no 1 for true: OpenAI refuses them too)
so that a bad value gets a 400 naming it instead of a guess.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


def _whole(v):
    """2.0 is 2 (a JSON encoder's choice, no information lost); 2.5, "2" and true are not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Count = Annotated[int, BeforeValidator(_whole)]


STRICT = ConfigDict(extra="allow", strict=True)


def tagged(kinds: dict[str, type[BaseModel]], what: str, default: Optional[str] = None):
    """A validator for a list item picked by its `type` (`default` when it has none): one error
    naming the unsupported type, not one per branch of the union."""
    def pick(v):
        if isinstance(v, BaseModel):
            return v
        kind = v.get("type", default) if isinstance(v, dict) else None
        if kind not in kinds:
            raise ValueError(f"{what} of type {kind!r} are not supported ({', '.join(dict.fromkeys(kinds))} are)")
        return kinds[kind].model_validate(v)
    return BeforeValidator(pick)


class _Body(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1)
    max_tokens: Optional[Count] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[Count] = Field(None, ge=-(2**63), le=2**64 - 1, description="Any 64-bit integer.")
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    n: Count = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256, description=(
        "Requests reuse only cached prefixes of requests with the same salt (and, with API keys, the same key)."))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = STRICT
    type: str
    text: Optional[str] = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: this is a text model")
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments as a JSON string, as the model wrote them.")


class ToolCallIn(BaseModel):
    """A call from an earlier assistant turn, as a client sends it back."""
    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _by_role(self):
        if self.role == "user" and self.content is None:
            raise ValueError("a user message needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: content a string, developer a system message."""
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class FunctionDef(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="A JSON Schema object.")
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


def _tool_choice(v):
    """"none" / "auto" / "required" or {"type": "function", ...}: one error, not one per union branch."""
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise ValueError("expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
        return v
    return NamedToolChoice.model_validate(v)


# apply_chat_template's own parameters: the server sets them, a client's value would change what it returns
_TEMPLATE_OWN = ("messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                 "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                 "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


class JSONSchemaFormat(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema", description="Enforced by constrained decoding.")
    strict: Optional[bool] = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed only with it")
        return self


class ChatCompletionRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[Count] = Field(None, ge=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Annotated[Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]],
                           BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    chat_template_kwargs: Optional[dict[str, Any]] = Field(
        None, description="Extra variables for the chat template, e.g. enable_thinking.")
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Count] = Field(None, ge=0, le=20, description="Needs logprobs: true.")

    @field_validator("top_logprobs")
    @classmethod
    def _top(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwargs(cls, v):
        clash = [k for k in v or {} if k in _TEMPLATE_OWN]
        if clash:
            raise ValueError(f"{clash[0]!r} is set by the server, not by chat_template_kwargs")
        return v

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def tool_payload(self) -> dict[str, Any]:
        """Tool and format fields for the worker, unchanged but for pydantic's spelling."""
        out: dict[str, Any] = {}
        if self.tools:
            out["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.tool_choice is not None:
            out["tool_choice"] = self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()
        if self.parallel_tool_calls is not None:
            out["parallel_tool_calls"] = self.parallel_tool_calls
        if self.response_format is not None:
            out["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        if self.chat_template_kwargs:
            out["chat_template_kwargs"] = self.chat_template_kwargs
        if self.reasoning_effort is not None:
            out["reasoning_effort"] = self.reasoning_effort
        if self.logprobs:
            out["logprobs"], out["top_logprobs"] = True, self.top_logprobs or 0
        return out


class CompletionRequest(_Body):
    prompt: Union[str, list[int]]
    echo: bool = False
    logprobs: Optional[Count] = Field(None, description="Not supported here: use /v1/chat/completions.")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v is not None:
            raise ValueError("logprobs is supported on /v1/chat/completions, not on /v1/completions")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


_Body.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
