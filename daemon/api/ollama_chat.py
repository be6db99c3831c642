"""Ollama's generation routes: POST /api/chat and /api/generate.

Ollama's clients (Open WebUI, Zed, the `ollama` libraries) reach the same request path as the
other APIs: this module validates the body and routes it; `surfaces/ollama.py` translates it
and writes the answer as Ollama's NDJSON. What mlxd cannot honour is a 400 naming the field
(images, templates, `context`, `suffix`, an option it has no equivalent for), never ignored.
The model-listing routes (/api/tags, /api/show, /api/ps, /api/version) are `ollama.py`'s;
the embedding routes are `embeddings.py`'s.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, model_validator
from quart import Blueprint

from . import requests as rq
from .errors import APIError
from .schemas import STRICT
from .ollama import model as lookup
from .surfaces.ollama import Ollama, load_only

bp = Blueprint("ollama_chat", __name__)

# Fields of Ollama's requests that mlxd has no equivalent for: refused, with why
_UNSUPPORTED = {
    "images": "images are not supported: mlxd serves text models",
    "template": "a per-request template is not supported: mlxd renders the model's chat template "
                "(set chat_template in its config entry)",
    "context": "context (token ids of an earlier /api/generate answer) is not supported: send the "
               "conversation to /api/chat, whose prefix mlxd caches",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "logprobs": "logprobs are not supported on Ollama's routes: use /v1/chat/completions",
    "top_logprobs": "logprobs are not supported on Ollama's routes: use /v1/chat/completions",
    "width": "image generation is not supported", "height": "image generation is not supported",
    "steps": "image generation is not supported",
}


def _refuse_unsupported(body: BaseModel, where: str = "") -> None:
    for key, why in _UNSUPPORTED.items():
        if (body.model_extra or {}).get(key) not in (None, "", [], False):
            raise APIError(400, why, param=where + key)


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict, description="An object, as Ollama sends them.")


class ToolCallIn(BaseModel):
    model_config = STRICT
    function: FunctionCall
    id: Optional[str] = None


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_name: Optional[str] = None

    @model_validator(mode="after")
    def _calls(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        return self


class FunctionDef(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"] = "function"
    function: FunctionDef


class _Common(BaseModel):
    model_config = STRICT
    model: str = Field(min_length=1)
    format: Optional[Union[Literal["", "json"], dict[str, Any]]] = Field(
        None, description='"json" or a JSON schema; enforced by constrained decoding.')
    options: Optional[dict[str, Any]] = None
    stream: bool = True
    think: Optional[Union[bool, Literal["low", "medium", "high"]]] = None
    keep_alive: Any = None


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: Optional[list[Tool]] = None


class GenerateRequest(_Common):
    prompt: str = ""
    system: Optional[str] = None
    raw: bool = False


@bp.post("/api/chat")
async def chat():
    rq.check_open()
    body = await rq.body(ChatRequest)
    _refuse_unsupported(body)
    for i, m in enumerate(body.messages):
        _refuse_unsupported(m, f"messages.{i}.")
    handle = lookup(body.model)
    if not body.messages:
        return await load_only(handle, body, "chat")
    return await Ollama.run(body, handle, "chat")


@bp.post("/api/generate")
async def generate():
    rq.check_open()
    body = await rq.body(GenerateRequest)
    _refuse_unsupported(body)
    if body.raw and (body.system or body.think):
        raise APIError(400, "raw: true sends the prompt as it is, without the template that system and "
                            "think would go into", param="raw")
    handle = lookup(body.model)
    if not body.prompt:
        return await load_only(handle, body, "generate")
    return await Ollama.run(body, handle, "generate")
