"""GET /openapi.json: the API described from the same pydantic models that validate requests.

Request bodies come from `schemas.py`, so the description cannot drift from what is enforced
(and a fuzzer driven by it tests the real contract). Responses are small hand-written schemas
of the shapes clients rely on. Built once at import: it depends on nothing at runtime.
"""

from __future__ import annotations

import json

from quart import Blueprint, jsonify

from .anthropic import CountTokensRequest, MessagesRequest
from .embeddings import EmbeddingRequest, OllamaEmbed, OllamaEmbeddings
from .ollama import OllamaShow
from .ollama_chat import ChatRequest as OllamaChatRequest, GenerateRequest as OllamaGenerateRequest
from .responses import ResponsesRequest
from .schemas import ChatCompletionRequest, CompletionRequest

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _request_schemas(responses: dict, *models) -> dict:
    """The response schemas and each model's JSON schema (a model, or a (name, model) pair), with
    its `$defs` hoisted into components: shared by name where they are the same, renamed after
    their model where two APIs define different types of one name (OpenAI's request `Message`,
    Ollama's, and Anthropic's response `Message`)."""
    out: dict = dict(responses)
    for m in models:
        name, m = m if isinstance(m, tuple) else (m.__name__, m)
        s = m.model_json_schema(ref_template=REF)
        defs = s.pop("$defs", {})
        clashes = [k for k, v in defs.items() if k in out and out[k] != v]
        if clashes:
            text = json.dumps({"s": s, "defs": defs})
            for k in clashes:
                text = text.replace(json.dumps(REF.format(model=k)), json.dumps(REF.format(model=name + k)))
            moved = json.loads(text)
            s, defs = moved["s"], {(name + k if k in clashes else k): v for k, v in moved["defs"].items()}
        out.update(defs)
        out[name] = s
    return out


_str, _int = {"type": "string"}, {"type": "integer"}
_nullable_str = {"type": ["string", "null"]}


def _completion(object_: str, field: str, schema: dict) -> dict:
    """A completion response: OpenAI's envelope, choices carrying `field` (message or text)."""
    return {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": _str, "object": {"const": object_}, "created": _int, "model": _str,
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", field, "finish_reason"],
                "properties": {"index": _int, field: schema, "finish_reason": _nullable_str}}},
            "usage": _ref("Usage"),
        },
    }


_RESPONSES = {
    "Error": {
        "type": "object", "required": ["error"],
        "description": "OpenAI's error object: every 4xx/5xx of the OpenAI routes has this shape.",
        "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": _str, "type": _str, "param": _nullable_str, "code": _nullable_str},
        }},
    },
    "Usage": {
        "type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {"prompt_tokens": _int, "completion_tokens": _int, "total_tokens": _int,
                       "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": _int}}},
    },
    "ChatCompletion": _completion("chat.completion", "message", {
        "type": "object", "required": ["role", "content", "refusal"],
        "properties": {
            "role": {"const": "assistant"}, "content": _nullable_str, "refusal": {"type": "null"},
            "reasoning_content": {"type": "string", "description": "The model's reasoning, apart from `content`."},
            "reasoning": {"type": "string", "description": "The same as `reasoning_content`."},
            "tool_calls": {"type": "array", "items": {
                "type": "object", "required": ["id", "type", "function"],
                "properties": {"id": _str, "type": {"const": "function"}, "function": {
                    "type": "object", "required": ["name", "arguments"],
                    "properties": {"name": _str, "arguments": {"type": "string",
                                                               "description": "JSON text, as the model wrote it."}}}}}},
        }}),
    "TextCompletion": _completion("text_completion", "text", _str),
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object", "created", "owned_by"],
            "properties": {"id": _str, "object": {"const": "model"}, "created": _int, "owned_by": _str,
                           "state": _str, "alias_of": _str, "aliases": {"type": "array", "items": _str},
                           "type": {"const": "model"}, "display_name": _str, "created_at": _str}}},
                       "has_more": {"type": "boolean"}, "first_id": _nullable_str, "last_id": _nullable_str},
        "description": "Read by both SDKs: OpenAI's `object`/`owned_by`, Anthropic's `type`/`display_name`/`has_more`.",
    },
    "ReloadResult": {
        "type": "object", "required": ["applied"],
        "properties": {"applied": {"type": "boolean"}, "generation": _int, "error": _str,
                       "changes": {"type": "object"}},
    },
    "StreamEvent": {
        "type": "object", "required": ["data"],
        "description": "One server-sent event: `data` is a chunk as JSON, an error object, or `[DONE]`.",
        "properties": {"data": _str, "event": _str},
    },
    "Object": {"type": "object"},
    "AnthropicError": {
        "type": "object", "required": ["type", "error"],
        "description": "Anthropic's error object: every 4xx/5xx of /v1/messages has this shape.",
        "properties": {"type": {"const": "error"}, "error": {
            "type": "object", "required": ["type", "message"], "properties": {"type": _str, "message": _str}}},
    },
    "Message": {
        "type": "object", "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
        "properties": {
            "id": _str, "type": {"const": "message"}, "role": {"const": "assistant"}, "model": _str,
            "content": {"type": "array", "items": {
                "type": "object", "required": ["type"],
                "properties": {"type": {"enum": ["text", "thinking", "tool_use"]}, "text": _str, "thinking": _str,
                               "id": _str, "name": _str, "input": {"type": "object"}}}},
            "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
            "stop_sequence": _nullable_str,
            "usage": {"type": "object", "required": ["input_tokens", "output_tokens"], "properties": {
                "input_tokens": _int, "output_tokens": _int, "cache_read_input_tokens": _int,
                "cache_creation_input_tokens": _int}},
        },
    },
    "Embeddings": {
        "type": "object", "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"}, "model": _str,
            "data": {"type": "array", "items": {
                "type": "object", "required": ["object", "index", "embedding"],
                "properties": {"object": {"const": "embedding"}, "index": _int, "embedding": {
                    "type": ["array", "string"], "items": {"type": "number"},
                    "description": "Floats, or with `encoding_format: base64` the little-endian float32 bytes."}}}},
            "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                      "properties": {"prompt_tokens": _int, "total_tokens": _int}},
        },
    },
    "OllamaError": {
        "type": "object", "required": ["error"],
        "description": "Ollama's error object: every 4xx/5xx of the /api/ routes has this shape.",
        "properties": {"error": _str},
    },
    "OllamaEmbedResponse": {
        "type": "object", "required": ["model", "embeddings"],
        "properties": {"model": _str, "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                       "total_duration": _int, "load_duration": _int, "prompt_eval_count": _int},
    },
    "OllamaEmbeddingsResponse": {
        "type": "object", "required": ["embedding"],
        "properties": {"embedding": {"type": "array", "items": {"type": "number"}}},
    },
    "OllamaDetails": {
        "type": "object",
        "properties": {"parent_model": _str, "format": _str, "family": _str,
                       "families": {"type": ["array", "null"], "items": _str},
                       "parameter_size": _str, "quantization_level": _str},
    },
    "OllamaTags": {
        "type": "object", "required": ["models"],
        "description": "Every model entry of the config; a field mlxd does not know yet (a model never loaded) is empty.",
        "properties": {"models": {"type": "array", "items": {
            "type": "object", "required": ["name", "model", "modified_at", "size", "digest", "details"],
            "properties": {"name": _str, "model": _str, "modified_at": _str, "size": _int, "digest": _str,
                           "details": _ref("OllamaDetails")}}}},
    },
    "OllamaPs": {
        "type": "object", "required": ["models"],
        "description": "The loaded models; `expires_at` is the last request plus the idle TTL (2318 for none).",
        "properties": {"models": {"type": "array", "items": {
            "type": "object", "required": ["name", "model", "size", "digest", "details", "expires_at", "size_vram"],
            "properties": {"name": _str, "model": _str, "size": _int, "digest": _str, "details": _ref("OllamaDetails"),
                           "expires_at": _str, "size_vram": _int, "context_length": _int}}}},
    },
    "OllamaShowResponse": {
        "type": "object", "required": ["modelfile", "parameters", "template", "details", "model_info", "capabilities"],
        "properties": {"modelfile": _str, "parameters": _str, "template": _str, "details": _ref("OllamaDetails"),
                       "model_info": {"type": "object"}, "capabilities": {"type": "array", "items": _str},
                       "modified_at": _str},
    },
    "OllamaVersion": {"type": "object", "required": ["version"], "properties": {"version": _str}},
    "OllamaChatResponse": {
        "type": "object", "required": ["model", "created_at", "message", "done"],
        "description": "The whole answer; streamed, each NDJSON line has this shape, the last with `done: true` "
                       "and the counts and durations (nanoseconds).",
        "properties": {"model": _str, "created_at": _str, "done": {"type": "boolean"}, "done_reason": _str,
                       "message": {"type": "object", "required": ["role", "content"],
                                   "properties": {"role": {"const": "assistant"}, "content": _str, "thinking": _str,
                                                  "tool_calls": {"type": "array", "items": {"type": "object"}}}},
                       **{k: _int for k in ("total_duration", "load_duration", "prompt_eval_count",
                                            "prompt_eval_duration", "eval_count", "eval_duration")}},
    },
    "OllamaGenerateResponse": {
        "type": "object", "required": ["model", "created_at", "response", "done"],
        "description": "As OllamaChatResponse, the text in `response` (and `thinking`).",
        "properties": {"model": _str, "created_at": _str, "done": {"type": "boolean"}, "done_reason": _str,
                       "response": _str, "thinking": _str,
                       **{k: _int for k in ("total_duration", "load_duration", "prompt_eval_count",
                                            "prompt_eval_duration", "eval_count", "eval_duration")}},
    },
    "TokenCount": {"type": "object", "required": ["input_tokens"], "properties": {"input_tokens": _int}},
    "Response": {
        "type": "object", "required": ["id", "object", "created_at", "model", "status", "output", "usage"],
        "properties": {
            "id": _str, "object": {"const": "response"}, "created_at": _int, "model": _str,
            "status": {"enum": ["completed", "incomplete"]}, "previous_response_id": _nullable_str,
            "output": {"type": "array", "items": {
                "type": "object", "required": ["type", "id"],
                "properties": {"type": {"enum": ["message", "reasoning", "function_call"]}, "id": _str}}},
            "usage": {"type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"], "properties": {
                "input_tokens": _int, "output_tokens": _int, "total_tokens": _int,
                "input_tokens_details": {"type": "object", "properties": {"cached_tokens": _int}}}},
        },
    },
}

_ERRORS = {
    400: "Invalid request: bad JSON, or a field's value (named in `error.param`).",
    401: "Missing or wrong API key.",
    403: "Refused before any route ran: a Host that is not this daemon's (DNS rebinding), "
         "an Origin not in `server.allowed_origins`, or a cross-site action; Ollama's pull, push, create, "
         "copy and delete, always (mlxd reads its models from its config file).",
    404: "No such model.",
    413: "Request body too large.",
    415: "The body is not labelled `application/json`.",
    429: "The model's queue is full, or the key's rate limit is reached; retry after `Retry-After` seconds.",
    503: "The model's worker is unavailable, or mlxd is shutting down.",
    504: "The request took longer than `server.request_timeout`.",
}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: dict, errors=(401,), body: str | None = None, error="Error", **extra) -> dict:
    op = {"summary": summary, "responses": {"200": ok}, **extra}
    for code in sorted({*errors, 403} | ({415} if body else set())):   # the origin guard's, on every route
        op["responses"][str(code)] = _json(_ref(error), _ERRORS[code])
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


def _completion(summary: str, body: str, result: str, error="Error",
                stream="server-sent events ending in `data: [DONE]`") -> dict:
    ok = {"description": f"The result; with `stream: true`, {stream}.",
          "content": {"application/json": {"schema": _ref(result)},
                      "text/event-stream": {"schema": _ref("StreamEvent")}}}
    op = _op(summary, ok, errors=(400, 401, 404, 413, 429, 503, 504), body=body, error=error)
    if error == "AnthropicError":
        op["responses"]["529"] = _json(_ref(error), "The model's queue is full (Anthropic's overloaded_error).")
        op["parameters"] = [{"name": "beta", "in": "query", "required": False, "schema": _str,
                             "description": "Sent by Claude Code; accepted and ignored."}]
    return op


_EMBED = (400, 401, 404, 413, 429, 503, 504)


def _ollama_generation(summary: str, body: str, result: str) -> dict:
    ok = {"description": "The answer; streamed (the default, `stream: true`) as NDJSON lines of the same shape.",
          "content": {"application/json": {"schema": _ref(result)},
                      "application/x-ndjson": {"schema": _ref(result)}}}
    return _op(summary, ok, errors=(400, 401, 404, 413, 429, 503, 504), body=body, error="OllamaError")


def _refused(what: str) -> dict:
    """An Ollama route that would change the model list: always a 403 (the config file is the list)."""
    op = _op(f"Ollama: {what} a model is refused with a 403 naming the config file.", _json(_ref("Object")),
             errors=(401, 413), body="Object", error="OllamaError")
    del op["responses"]["200"]
    return op


def build_spec() -> dict:
    schemas = _request_schemas(_RESPONSES, ChatCompletionRequest, CompletionRequest, MessagesRequest, CountTokensRequest,
                                  ResponsesRequest, EmbeddingRequest, OllamaEmbed, OllamaEmbeddings, OllamaShow,
                                  ("OllamaChatRequest", OllamaChatRequest),
                                  ("OllamaGenerateRequest", OllamaGenerateRequest))
    obj = _json(_ref("Object"))
    reload = _op("Re-read the config file.", _json(_ref("ReloadResult")))
    reload["responses"]["400"] = _json(_ref("ReloadResult"), "The config did not load; nothing changed.")
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlxd", "version": "0.1.0",
                 "description": "MLX language and embedding models behind OpenAI-, Anthropic- and Ollama-compatible APIs."},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/health": {"get": _op("200 once every preloaded model is ready; 503 before, and while shutting down.", obj, errors=(503,), security=[])},
            "/v1/status": {"get": _op("Models, workers, config generation.", obj)},
            "/metrics": {"get": _op("Prometheus metrics.", {
                "description": "OK", "content": {"text/plain": {"schema": _str}}})},
            "/admin/reload": {"post": reload},
            "/v1/models": {"get": _op("Models and their aliases.", _json(_ref("ModelList")))},
            "/v1/models/{name}": {"get": _op(
                "One model or alias.", _json(_ref("Object")), errors=(401, 404),
                parameters=[{"name": "name", "in": "path", "required": True, "schema": _str}])},
            "/v1/chat/completions": {"post": _completion(
                "Chat completion.", "ChatCompletionRequest", "ChatCompletion")},
            "/v1/completions": {"post": _completion(
                "Text completion.", "CompletionRequest", "TextCompletion")},
            "/v1/messages": {"post": _completion(
                "Anthropic Messages.", "MessagesRequest", "Message", error="AnthropicError",
                stream="Anthropic's events (message_start ... message_stop, `ping` while waiting)")},
            "/v1/messages/count_tokens": {"post": _op(
                "A Messages request's prompt length in tokens.", _json(_ref("TokenCount")),
                errors=(400, 401, 404, 413, 503), body="CountTokensRequest", error="AnthropicError")},
            "/v1/responses": {"post": _completion(
                "OpenAI Responses.", "ResponsesRequest", "Response",
                stream="the Responses events (response.created ... response.completed)")},
            "/v1/embeddings": {"post": _op(
                "Embeddings of one or more inputs (text or token ids).", _json(_ref("Embeddings")),
                errors=_EMBED, body="EmbeddingRequest")},
            "/api/chat": {"post": _ollama_generation(
                "Ollama: a chat turn (tools, format, think, options, keep_alive).", "OllamaChatRequest",
                "OllamaChatResponse")},
            "/api/generate": {"post": _ollama_generation(
                "Ollama: a completion of one prompt (templated unless `raw`).", "OllamaGenerateRequest",
                "OllamaGenerateResponse")},
            "/api/embed": {"post": _op(
                "Ollama: embeddings of one or more inputs.", _json(_ref("OllamaEmbedResponse")),
                errors=_EMBED, body="OllamaEmbed", error="OllamaError")},
            "/api/embeddings": {"post": _op(
                "Ollama's older route: the embedding of one prompt.", _json(_ref("OllamaEmbeddingsResponse")),
                errors=_EMBED, body="OllamaEmbeddings", error="OllamaError")},
            "/api/tags": {"get": _op("Ollama: the config's models.", _json(_ref("OllamaTags")), errors=(401, 503),
                                     error="OllamaError")},
            "/api/ps": {"get": _op("Ollama: the loaded models.", _json(_ref("OllamaPs")), errors=(401, 503),
                                   error="OllamaError")},
            "/api/show": {"post": _op("Ollama: one model's details, template and parameters.",
                                      _json(_ref("OllamaShowResponse")), errors=(400, 401, 404, 413, 503),
                                      body="OllamaShow", error="OllamaError")},
            "/api/version": {"get": _op("Ollama: mlxd's version.", _json(_ref("OllamaVersion")), error="OllamaError")},
            **{f"/api/{name}": {method: _refused(what)} for name, method, what in (
                ("pull", "post", "Pulling"), ("push", "post", "Pushing"), ("create", "post", "Creating"),
                ("copy", "post", "Copying"), ("delete", "delete", "Deleting"))},
            "/v1/cache/stats": {"get": _op("Prefix-cache statistics per model.", obj)},
            "/v1/cache": {"delete": _op(
                "Clear one model's prefix cache.",
                _json({"type": "object", "required": ["model", "cleared_entries"],
                       "properties": {"model": _str, "cleared_entries": _int}}),
                errors=(400, 401, 404, 503),
                parameters=[{"name": "model", "in": "query", "required": True, "schema": _str}])},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "`Authorization: Bearer KEY`, when keys are configured."},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                           "description": "The same keys, as Anthropic clients send them."}},
        },
    }


SPEC = build_spec()


@bp.get("/openapi.json")
async def openapi_json():
    return jsonify(SPEC)
