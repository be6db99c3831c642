"""Request bodies of the OpenAI routes, validated by pydantic.

Unknown fields are accepted and ignored, as clients send many (user, n=1, logprobs=false);
fields we accept are checked strictly so that a bad value gets a 400 naming it.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1, description="Any 64-bit integer.")
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def template_messages(self) -> list[dict[str, Any]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionRequest(_Body):
    prompt: Union[str, list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


_Body.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
