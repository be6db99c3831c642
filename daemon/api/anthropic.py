"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

Claude Code and other Anthropic clients (`ANTHROPIC_BASE_URL`) reach the same request path
as the OpenAI routes. This module holds the request's schema and the routes; the
translation into the worker's payload and the content blocks out are `surfaces/messages.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, model_validator
from quart import Blueprint, jsonify

from . import requests as rq
from .schemas import STRICT, Count, tagged
from .surfaces import serve
from .surfaces.messages import Messages, prompt_payload

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


# -- routes -------------------------------------------------------------------------------

@bp.post("/v1/messages")
async def messages():
    rq.check_open()
    body = await rq.body(MessagesRequest)
    return await serve(Messages(body, rq.model(body.model)))


@bp.post("/v1/messages/count_tokens")
async def count_tokens():
    rq.check_open()
    body = await rq.body(CountTokensRequest)
    handle = rq.model(body.model)
    return jsonify({"input_tokens": await rq.count_tokens(handle, prompt_payload(body))})
