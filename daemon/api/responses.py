"""OpenAI's Responses API: POST /v1/responses, for Codex and newer OpenAI SDK code.

Stateless but for `previous_response_id`: the conversation of this daemon's recent
responses is kept in a bounded in-memory store (`server.responses_store` entries), so a
follow-up sends only its new items; with API keys, each key's responses are its own. This
module holds the request's schema, the store and the route; the translation and the output
items are `surfaces/responses.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, Field, model_validator
from quart import Blueprint

from . import requests as rq
from .schemas import STRICT, Count, FunctionDef, tagged
from .surfaces import serve
from .surfaces.responses import Responses

bp = Blueprint("responses", __name__)


class Store:
    """The last N responses' conversations, oldest dropped first; N read live from the config.
    Keyed by (owner, id): another key's response is as absent as an unknown one."""

    def __init__(self, size: Callable[[], int]):
        self.size, self.items = size, OrderedDict()

    def get(self, owner: str, rid: str) -> Optional[list[dict]]:
        return self.items.get((owner, rid))

    def put(self, owner: str, rid: str, messages: list[dict]) -> None:
        self.items[(owner, rid)] = messages
        while len(self.items) > max(self.size(), 0):
            self.items.popitem(last=False)


# -- the request --------------------------------------------------------------------------

class InputText(BaseModel):
    model_config = STRICT
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[InputText]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = STRICT
    type: Literal["function_call"]
    call_id: str
    name: str = Field(min_length=1)
    arguments: str


class FunctionOutputItem(BaseModel):
    model_config = STRICT
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[InputText]]


class ReasoningItem(BaseModel):
    """Reasoning sent back: accepted; templates drop earlier turns' reasoning."""
    model_config = STRICT
    type: Literal["reasoning"]


Item = Annotated[Union[InputMessage, FunctionCallItem, FunctionOutputItem, ReasoningItem], tagged(
    {"message": InputMessage, "function_call": FunctionCallItem, "function_call_output": FunctionOutputItem,
     "reasoning": ReasoningItem}, "input items", default="message")]


class FunctionTool(FunctionDef):
    """Chat's function definition, flattened into the tool as the Responses API has it."""
    type: Literal["function"]


class NamedFunction(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = {**STRICT, "populate_by_name": True}
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("type 'json_schema' needs 'name' and 'schema'")
        return self


class TextOptions(BaseModel):
    model_config = STRICT
    format: Optional[TextFormat] = None


class Reasoning(BaseModel):
    model_config = STRICT
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None


class ResponsesRequest(BaseModel):
    model_config = STRICT
    model: str = Field(min_length=1)
    input: Union[str, list[Item]]
    instructions: Optional[str] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedFunction]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextOptions] = None
    max_output_tokens: Optional[Count] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    reasoning: Optional[Reasoning] = None
    store: bool = True
    previous_response_id: Optional[str] = None
    stream: bool = False
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256, description=(
        "Requests reuse only cached prefixes of requests with the same salt (and, with API keys, the same key)."))


@bp.post("/v1/responses")
async def responses():
    rq.check_open()
    body = await rq.body(ResponsesRequest)
    return await serve(Responses(body, rq.model(body.model)))
