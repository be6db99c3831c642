"""`response_format` end to end: the official client, the real daemon and model, constrained decoding."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

MODEL = "smol-a"


def obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(required or props), "additionalProperties": False}


NAME = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "person": obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "enum": obj({"color": {"type": "string", "enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}}),
    "nested": obj({"pet": obj({"kind": {"enum": ["cat", "dog", "bird"]}, "name": NAME,
                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}}),
                   "indoor": {"type": "boolean"}}),
    "array": obj({"topic": NAME, "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                            "minItems": 1, "maxItems": 3}},
                 required=["scores"]),
}
SUBJECTS = ["a pirate", "a sunny day", "a house cat", "a marathon", "a jazz band"]


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def chat(client, content: str, stream: bool, **kw) -> tuple[str, str]:
    """The reply's text and finish_reason, streamed or not."""
    msgs = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    parts, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, stream=True, **kw):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_json_schema_outputs_validate_on_20_of_20(client):
    jobs = [(name, f"Describe {subject} as JSON.", i % 2 == 1)
            for name in SCHEMAS for i, subject in enumerate(SUBJECTS)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: chat(client, j[1], j[2], max_tokens=80,
                                               response_format=json_schema_format(j[0])), jobs))
    failures = []
    for (name, prompt, stream), (text, finish) in zip(jobs, results):
        try:
            assert finish == "stop"
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append((name, prompt, stream, finish, text, str(e)[:200]))
    assert not failures, failures


def test_json_object_and_the_sdk_parse_helper(client):
    text, finish = chat(client, 'Reply with a JSON object with keys "city" and "country" for the Eiffel Tower.',
                        False, max_tokens=60,
                        response_format={"type": "json_object"})
    assert finish == "stop" and isinstance(json.loads(text), dict), text

    from pydantic import BaseModel

    class City(BaseModel):      # the SDK sends it as a strict json_schema and parses the reply
        city: str
        country: str

    ask = [{"role": "user", "content": "Where is the Eiffel Tower? Reply with JSON."}]
    r = client.chat.completions.parse(model=MODEL, temperature=0, max_tokens=60, response_format=City, messages=ask)
    assert isinstance(r.choices[0].message.parsed, City)


def test_unconstrained_output_is_the_same_beside_constrained_requests(client):
    question = "What is the capital of France?"
    alone, _ = chat(client, question, False, max_tokens=24)
    long_text = json_schema_format("person")
    long_text["json_schema"]["schema"] = obj({"story": {"type": "string", "minLength": 400}})
    streams = [client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=64, stream=True, response_format=long_text,
        messages=[{"role": "user", "content": f"Tell story number {i}."}]) for i in range(3)]
    try:
        firsts = [next(s) for s in streams]     # each is decoding in the batch now
        beside, _ = chat(client, question, False, max_tokens=24)
        rest = [list(s) for s in streams]
    finally:
        for s in streams:
            s.close()
    assert beside == alone
    for first, chunks in zip(firsts, rest):
        text = "".join(c.choices[0].delta.content or "" for c in [first, *chunks] if c.choices)
        assert text.startswith('{') and '"story"' in text
        assert chunks[-1].choices[0].finish_reason == "length"     # still running when the other finished


@pytest.mark.parametrize("stream", [False, True])
def test_uncompilable_schema_is_a_400_naming_response_format(client, stream):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {
        "when": {"type": "string", "pattern": "(unclosed"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi", stream, max_tokens=8, response_format=bad)
    assert e.value.param == "response_format"
    assert "unclosed" in e.value.message


def test_malformed_response_format_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi", False, max_tokens=8,
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}})
    assert e.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi", False, max_tokens=8, response_format={"type": "yaml"})
    assert e.value.param == "response_format.type"
