"""The OpenAPI description's request schemas say what the pydantic models enforce, after their
definitions are hoisted into one shared components section (where two APIs name different
types alike, OpenAI's and Ollama's `Message`, each route must still point at its own)."""

from __future__ import annotations

from daemon.api.openapi import REF, build_spec
from daemon.api import anthropic, embeddings, ollama, ollama_chat, responses, schemas

PREFIX = REF.format(model="")


def _resolve(node, defs: dict, prefix: str, depth: int = 0):
    """`node` with every $ref replaced by the definition it names (to a fixed depth: some types nest)."""
    if depth > 12:
        return "..."
    if isinstance(node, dict):
        if "$ref" in node and node["$ref"].startswith(prefix):
            return _resolve(defs[node["$ref"][len(prefix):]], defs, prefix, depth + 1)
        return {k: _resolve(v, defs, prefix, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs, prefix, depth) for v in node]
    return node


def test_every_request_body_resolves_to_its_own_models_schema():
    spec = build_spec()
    components = spec["components"]["schemas"]
    routes = {
        ("/v1/chat/completions", "post"): schemas.ChatCompletionRequest,
        ("/v1/completions", "post"): schemas.CompletionRequest,
        ("/v1/messages", "post"): anthropic.MessagesRequest,
        ("/v1/messages/count_tokens", "post"): anthropic.CountTokensRequest,
        ("/v1/responses", "post"): responses.ResponsesRequest,
        ("/v1/embeddings", "post"): embeddings.EmbeddingRequest,
        ("/api/embed", "post"): embeddings.OllamaEmbed,
        ("/api/embeddings", "post"): embeddings.OllamaEmbeddings,
        ("/api/show", "post"): ollama.OllamaShow,
        ("/api/chat", "post"): ollama_chat.ChatRequest,
        ("/api/generate", "post"): ollama_chat.GenerateRequest,
    }
    for (path, method), model in routes.items():
        ref = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        served = _resolve(ref, components, PREFIX)
        own = model.model_json_schema()
        expected = _resolve({k: v for k, v in own.items() if k != "$defs"}, own.get("$defs", {}), "#/$defs/")
        assert served == expected, f"{path}: the description is not {model.__name__}'s schema"
    # the two Messages are told apart: Ollama's has `thinking`, OpenAI's does not
    ref = spec["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    ollama_message = components[ref[len(PREFIX):]]["properties"]["messages"]["items"]["$ref"][len(PREFIX):]
    assert ollama_message != "Message" and "thinking" in components[ollama_message]["properties"]
