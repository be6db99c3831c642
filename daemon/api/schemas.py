"""Request bodies of the OpenAI routes, validated by pydantic.

Unknown fields are accepted and ignored, as clients send many (user, n=1, logprobs=false);
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


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


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
    response_format: Optional[ResponseFormat] = None

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
