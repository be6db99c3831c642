"""Fuzzing the HTTP API from its own OpenAPI description, plus hand-picked hostile inputs.

The contract: whatever a client sends, mlxd answers 2xx or 4xx (never a 5xx, never a dead
worker), and every 4xx is its API's error object (OpenAI's, or Anthropic's on /v1/messages),
so client libraries can report it.
The fuzz run is short here; `ops/bench/fuzz.sh` runs the long one (FUZZ_EXAMPLES=2000).
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from conftest import Daemon, smol

MODEL = "fuzz"
MAX_TOKENS = 8                       # generation is the slow part: keep every completion short
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
VOCAB = 49152                        # SmolLM2's vocabulary


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One small model of our own: the fuzzer must not disturb the shared session daemon."""
    d = Daemon(tmp_path_factory.mktemp("fuzz"), [smol(MODEL, sampling={"max_tokens": MAX_TOKENS})])
    d.start()
    yield d
    d.stop()


@pytest.fixture
def http(daemon):
    """A client, once the model is ready (a test before may have killed its worker)."""
    daemon.wait_ready(120)
    with httpx.Client(base_url=daemon.url, timeout=120) as c:
        yield c


def assert_openai_error(resp) -> None:
    """A 4xx/5xx body is `{"error": {"message": str, "type": str, ...}}`."""
    body = resp.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict), f"{resp.status_code} is not an OpenAI error: {resp.text[:300]}"
    assert isinstance(err.get("message"), str) and isinstance(err.get("type"), str), resp.text[:300]


def assert_sane(resp) -> None:
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:300]}"
    if resp.status_code >= 400:
        assert_openai_error(resp)


# -- the schemathesis run -------------------------------------------------------------------

def assert_anthropic_error(resp) -> None:
    """A 4xx/5xx body on /v1/messages is `{"type": "error", "error": {"type": str, "message": str}}`."""
    body = resp.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(body, dict) and body.get("type") == "error" and isinstance(err, dict), resp.text[:300]
    assert isinstance(err.get("message"), str) and isinstance(err.get("type"), str), resp.text[:300]


def assert_ollama_error(resp) -> None:
    """A 4xx/5xx body on an /api/ route is Ollama's `{"error": str}`."""
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), resp.text[:300]


def api_error_format(ctx, response, case) -> None:
    if 400 <= response.status_code < 500:
        if case.path.startswith("/v1/messages"):
            assert_anthropic_error(response)
        elif case.path.startswith("/api/"):
            assert_ollama_error(response)
        else:
            assert_openai_error(response)


def _tame(case) -> None:
    """Keep generation cheap, send most requests to the real model, and step around known bugs.

    Most bodies name the real model (the rest exercise 404); any max_tokens that the body
    parser would coerce to a number above MAX_TOKENS ("500", 500.0) is capped.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and len(body["model"]) % 4:
        body["model"] = MODEL
    capped = [(body, key) for key in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
    if isinstance(body.get("options"), dict):        # Ollama's
        capped.append((body["options"], "num_predict"))
    for where, key in capped:
        try:
            if float(where.get(key)) > MAX_TOKENS or float(where.get(key)) in (-1, -2):   # Ollama's "no limit"
                where[key] = MAX_TOKENS
        except (TypeError, ValueError):
            pass
    # Ollama's keep_alive unloads the model (0) or sets its TTL: test_ollama_chat covers it, and
    # a fuzz run that kept reloading the model would spend its time loading
    body.pop("keep_alive", None)


@pytest.fixture(scope="module")
def api_schema(daemon):
    schema = schemathesis.openapi.from_url(f"{daemon.url}/openapi.json")
    schema.config.update(base_url=daemon.url)
    return schema


def test_openapi_describes_the_routes(api_schema, http):
    spec = http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"/v1/messages", "/v1/messages/count_tokens", "/v1/responses"} <= set(spec["paths"])
    assert "system" in spec["components"]["schemas"]["MessagesRequest"]["properties"]
    assert "previous_response_id" in spec["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"/v1/embeddings", "/api/embed", "/api/embeddings", "/api/tags", "/api/show", "/api/ps", "/api/version",
            "/api/pull", "/api/delete", "/api/chat", "/api/generate"} <= set(spec["paths"])
    assert "encoding_format" in spec["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert set(spec["paths"]["/api/pull"]["post"]["responses"]) == {"401", "403", "413", "415"}


def test_fuzz(api_schema, daemon):
    """Valid and invalid bodies, weighted towards the generating routes."""
    ops = [api_schema[path]["POST"] for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages",
                                                 "/v1/messages/count_tokens", "/v1/responses")]
    strategy = st.one_of(
        *(op.as_strategy(generation_mode=mode) for op in ops for mode in GenerationMode),
        api_schema.as_strategy(),
    )
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, api_error_format]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        _tame(case)
        resp = case.call(timeout=120)
        case.validate_response(resp, checks=checks)

    run()
    assert daemon.model_status(MODEL)["restarts"] == 0, "a worker died during the fuzz run"


# -- edge cases -----------------------------------------------------------------------------

def chat(content="hi", **over) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **over}


def completion(prompt="Once upon a time", **over) -> dict:
    return {"model": MODEL, "prompt": prompt, **over}


def test_deep_nesting_is_a_400(http):
    """Python's json recurses; at ~1000 levels it raises RecursionError, which is not a ValueError."""
    for depth in (5_000, 100_000):
        body = '{"model": "fuzz", "prompt": "hi", "x": ' + "[" * depth + "]" * depth + "}"
        r = http.post("/v1/completions", content=body)
        assert r.status_code == 400, r.text[:300]
        assert_openai_error(r)
        assert "nested too deeply" in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", ["[]", "null", "1", '"text"', "true", "", "{", "\xff"])
def test_non_object_bodies(http, raw):
    r = http.post("/v1/chat/completions", content=raw.encode("latin-1"))
    assert r.status_code == 400
    assert_openai_error(r)


@pytest.mark.parametrize("content_type, browser, status", [
    ("application/json; charset=utf-8", True, 200),
    (None, False, 200),                                   # httpx content=, urllib: no type named
    ("application/x-www-form-urlencoded", False, 200),    # curl -d's default
    (None, True, 415),                                    # a browser must say JSON
    ("application/x-www-form-urlencoded", True, 415),
    ("text/plain", False, 415),                           # what a page sends without a preflight
    ("multipart/form-data; boundary=x", False, 415),
])
def test_content_types(http, content_type, browser, status):
    """A JSON route wants application/json (a page's simple requests cannot send it); a client
    that is not a browser may also name no type or curl's default and is read as JSON."""
    headers = {"Content-Type": content_type} if content_type else {}
    if browser:
        headers["Sec-Fetch-Site"] = "same-origin"
    r = http.post("/v1/completions", content=json.dumps(completion(max_tokens=2)), headers=headers)
    assert r.status_code == status, r.text
    if status == 415:
        assert_openai_error(r)
        assert r.json()["error"]["code"] == "unsupported_media_type"


def test_form_body_is_a_400(http):
    """A real form body (curl -d's type, from a script) gets past the type check and is not JSON."""
    r = http.post("/v1/completions", data={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 400
    assert_openai_error(r)


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "مرحبا بالعالم", "🦙🔥👩‍👩‍👧", "e\u0301\u0301",
                                  "a\x00b", "\u200b\ufeff", "\U0010fffd"])
def test_unicode_messages(http, text):
    r = http.post("/v1/chat/completions", json=chat(text))
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("where", ["messages", "prompt", "stop"])
def test_lone_surrogate_is_a_400(http, where):
    esc = '"\\ud800"'
    body = {"messages": '{"model":"fuzz","messages":[{"role":"user","content":%s}]}' % esc,
            "prompt": '{"model":"fuzz","prompt":%s}' % esc,
            "stop": '{"model":"fuzz","prompt":"hi","stop":%s}' % esc}[where]
    r = http.post("/v1/completions" if where != "messages" else "/v1/chat/completions", content=body)
    assert r.status_code == 400, r.text[:300]
    assert_openai_error(r)


@pytest.mark.parametrize("body, param", [
    (chat(messages=[]), "messages"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(n=2), "n"),
    (chat(max_tokens=-1), "max_tokens"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=2.5), "max_tokens"),
    (chat(max_completion_tokens=-5), "max_completion_tokens"),
    (chat(temperature=-0.1), "temperature"),
    (chat(top_p=0), "top_p"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=None), "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
])
def test_invalid_values_are_400_naming_the_field(http, body, param):
    url = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = http.post(url, json=body)
    assert r.status_code == 400, r.text
    assert_openai_error(r)
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("body", [
    chat(stop=["a", "b", "c", "d"], max_tokens=2),
    chat(max_tokens=2.0),                                   # an integral float is an int
    chat(max_tokens=2, user="u1", logprobs=False, frequency_penalty=0, tools=None, some_future_field={"x": 1}),
    chat(messages=[{"role": "user", "content": "hi", "name": "bob", "extra": 1}], max_tokens=2),
    completion(prompt=[1, 2, 3], max_tokens=2),
])
def test_accepted(http, body):
    url = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = http.post(url, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_unknown_model_is_404(http):
    r = http.post("/v1/chat/completions", json=chat(model="no-such-model"))
    assert r.status_code == 404
    assert_openai_error(r)


# Last in the module: each of these once killed the worker (the `http` fixture waits for a restart).

@pytest.mark.parametrize("token", [-1, VOCAB, 10**9, 2**64])
def test_invalid_token_ids_are_400(http, token):
    """Once garbage (-1, VOCAB), a SIGSEGV (10**9), an OverflowError (2**64)."""
    r = http.post("/v1/completions", json=completion(prompt=[1, token], max_tokens=2))
    assert r.status_code == 400, f"{r.status_code}: {r.text[:200]}"
    assert_openai_error(r)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_out_of_range_seed_is_handled(http, seed):
    r = http.post("/v1/completions", json=completion(seed=seed, temperature=1.0, max_tokens=2))
    assert_sane(r)
