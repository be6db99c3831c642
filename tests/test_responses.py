"""OpenAI's Responses API over the official `openai` SDK, against the real daemon and model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from test_agents import SYSTEM, TOOLS, agent_daemon

R_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def agent_input(path="main.py") -> list[dict]:
    """Five earlier calls of the read tool as input items, then the next request."""
    items = []
    for i, c in enumerate("abcde"):
        items += [{"role": "user", "content": f"Read {c}.py"},
                  {"type": "function_call", "call_id": f"call_{i}", "name": "read",
                   "arguments": json.dumps({"path": f"{c}.py"})}]
    return items + [{"role": "user", "content": [{"type": "input_text", "text": f"Read {path}"}]}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with agent_daemon(tmp_path_factory.mktemp("responses"), server={"responses_store": 4}) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    return daemon.openai(timeout=600)


def test_text_response(client):
    r = client.responses.create(model="agent", input="What is the capital of France?", max_output_tokens=6,
                                instructions="Answer in one word.")
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "agent"
    assert r.output_text and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6 and r.usage.input_tokens > 5
    assert r.usage.input_tokens_details.cached_tokens >= 0 and r.instructions == "Answer in one word."


def test_streamed_events_match_the_collected_response(client):
    kw = dict(model="agent", input=[{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": "Say hello."}], max_output_tokens=64)
    full = client.responses.create(**kw)
    assert full.status == "completed"
    with client.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    for k in ("response.output_item.added", "response.output_text.delta", "response.output_item.done"):
        assert k in kinds
    assert final.output_text == full.output_text
    assert events[-1].response.usage.input_tokens_details.cached_tokens > 0      # the same prompt again
    assert [e.sequence_number for e in events] == list(range(len(events)))
    cut = list(client.responses.create(stream=True, **{**kw, "max_output_tokens": 3}))
    assert cut[-1].type == "response.incomplete"
    assert cut[-1].response.incomplete_details.reason == "max_output_tokens"


def test_function_call_round_trip_with_previous_response_id(client):
    first = client.responses.create(model="agent", instructions=SYSTEM, input=agent_input(), tools=R_TOOLS,
                                    max_output_tokens=40)
    [call] = [o for o in first.output if o.type == "function_call"]
    assert call.name == "read" and json.loads(call.arguments) == {"path": "main.py"} and call.call_id
    second = client.responses.create(model="agent", instructions=SYSTEM, tools=R_TOOLS, max_output_tokens=20,
                                     previous_response_id=first.id, input=[
                                         {"type": "function_call_output", "call_id": call.call_id,
                                          "output": "print('hi')"}])
    assert second.previous_response_id == first.id and second.output
    # everything the first response saw and wrote was served from the prefix cache
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens + first.usage.output_tokens - 1


def test_streamed_function_call_arguments(client):
    with client.responses.stream(model="agent", instructions=SYSTEM, input=agent_input("x.py"), tools=R_TOOLS,
                                 tool_choice="auto", max_output_tokens=40) as s:
        deltas = [e.delta for e in s if e.type == "response.function_call_arguments.delta"]
        final = s.get_final_response()
    assert len(deltas) > 1 and json.loads("".join(deltas)) == {"path": "x.py"}
    [call] = [o for o in final.output if o.type == "function_call"]
    assert call.arguments == "".join(deltas)


def test_json_schema_text_format_is_enforced(client):
    """Enforced by grammar: the tiny model does not write this object on its own."""
    schema = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.responses.create(model="agent", input="Name a city.", max_output_tokens=64,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                 "strict": True}})
    value = json.loads(r.output_text)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


def test_reasoning_items_and_effort(client):
    kw = dict(model="thinker", input="What is the capital of France?", max_output_tokens=12)
    r = client.responses.create(**kw)
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text
    events = list(client.responses.create(stream=True, **kw))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == r.output[0].content[0].text
    high = client.responses.create(**kw, reasoning={"effort": "high"})
    assert high.usage.input_tokens > r.usage.input_tokens          # "Effort: high" reached the template


def test_previous_response_id_unknown_not_stored_and_bounded(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="agent", input="hi", previous_response_id="resp_nope", max_output_tokens=1)
    assert e.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model="agent", input="hi", store=False, max_output_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="agent", input="hi", previous_response_id=unstored.id, max_output_tokens=1)
    ids = [client.responses.create(model="agent", input=f"hi {i}", max_output_tokens=1).id for i in range(5)]
    with pytest.raises(openai.NotFoundError):     # server.responses_store: 4 keeps the last four
        client.responses.create(model="agent", input="hi", previous_response_id=ids[0], max_output_tokens=1)
    client.responses.create(model="agent", input="hi", previous_response_id=ids[1], max_output_tokens=1)


@pytest.mark.parametrize("extra,param", [
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0"),
    ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"max_output_tokens": "8"}, "max_output_tokens"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
])
def test_bad_fields_are_400_naming_the_field(daemon, extra, param):
    body = {"model": "agent", "input": "hi", "tools": R_TOOLS[:1], **extra}
    r = httpx.post(f"{daemon.url}/v1/responses", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
