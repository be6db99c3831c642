"""The OpenAI API end to end: the official client, the real daemon, real workers."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import openai
import pytest

from conftest import SMOL_B_CONTEXT

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_names_and_aliases(client):
    ids = {m.id for m in client.models.list().data}
    assert {"smol-a", "smol-b", "default", "smol"} <= ids


def test_chat_non_streaming_answers_and_counts(client):
    r = client.chat.completions.create(model="smol-a", messages=FRANCE, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.model == "smol-a"
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_respects_max_tokens(client):
    r = client.completions.create(model="smol-b", prompt="The first three planets are", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.choices[0].text.strip()


def test_streaming_equals_non_streaming(client):
    kw = dict(model="smol-b", messages=FRANCE, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_streaming(client):
    chunks = list(client.completions.create(model="smol-a", prompt="Once upon a time", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 12


def test_alias_selects_model(client):
    r = client.chat.completions.create(model="default", messages=FRANCE, max_tokens=8, temperature=0)
    assert r.model == "smol-a"


def test_unknown_model_is_404_in_openai_format(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=FRANCE)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found"
    assert "nope" in e.value.body["message"]


@pytest.mark.parametrize("body,field", [
    ({"model": "smol-a", "messages": FRANCE, "temperature": 7}, "temperature"),
    ({"model": "smol-a", "messages": FRANCE, "max_tokens": 0}, "max_tokens"),
    ({"model": "smol-a"}, "messages"),
    ({"model": "smol-a", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": FRANCE}, "model"),
    ({"model": "smol-a", "messages": FRANCE, "max_tokens": "8"}, "max_tokens"),     # no guessing at types
    ({"model": "smol-a", "messages": FRANCE, "max_tokens": True}, "max_tokens"),
    ({"model": "smol-a", "messages": FRANCE, "stream": "yes"}, "stream"),
    ({"model": "smol-a", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "smol-a", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),
])
def test_malformed_bodies_are_400_naming_the_field(two_model_daemon, body, field):
    r = httpx.post(f"{two_model_daemon.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field
    assert field in err["message"]


@pytest.mark.parametrize("prompt,field", [(None, "prompt"), ([1, "2"], "prompt.1"), ([1, 2.5], "prompt.1")])
def test_malformed_completion_prompts_name_the_field(two_model_daemon, prompt, field):
    r = httpx.post(f"{two_model_daemon.url}/v1/completions", json={"model": "smol-a", "prompt": prompt}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_integers_are_fine_where_numbers_are_expected(client):
    r = client.chat.completions.create(model="smol-a", messages=FRANCE, max_tokens=2, temperature=0, top_p=1)
    assert r.usage.completion_tokens >= 1


def test_invalid_json_is_400(two_model_daemon):
    r = httpx.post(f"{two_model_daemon.url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_context_length_exceeded_is_400_with_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol-a", prompt=[28] * 8192, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "8192" in e.value.body["message"]


def test_max_tokens_beyond_the_context_is_clamped(client):
    """10M tokens asked with 40 left in smol-b's context: the answer ends there, with "length"."""
    prompt = [28] * (SMOL_B_CONTEXT - 40)
    r = client.completions.create(model="smol-b", prompt=prompt, max_tokens=10_000_000, temperature=0)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 40


def test_stop_strings_cut_the_output(client):
    r = client.completions.create(model="smol-a", prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0, stop=[" 8"])
    assert r.choices[0].finish_reason == "stop"
    assert " 8" not in r.choices[0].text
    assert "7" in r.choices[0].text


def test_temperature_samples_and_the_seed_picks_the_draw(client):
    kw = dict(model="smol-a", messages=[{"role": "user", "content": "Write a word."}], max_tokens=16, top_p=0.9)

    def ask(**more) -> str:
        return client.chat.completions.create(**kw, **more).choices[0].message.content

    greedy = ask(temperature=0)
    draws = [ask(temperature=1.0, seed=s) for s in range(5)]
    assert ask(temperature=1.0, seed=3) == draws[3]              # a seed repeats its draw
    assert len(set(draws) - {greedy}) >= 2, (greedy, draws)      # other seeds draw otherwise, not greedily


def test_eight_concurrent_streams_across_two_models(client):
    results, errors = {}, []

    def one(i):
        model = "smol-a" if i % 2 else "smol-b"
        try:
            chunks = list(client.chat.completions.create(
                model=model, max_tokens=16 + i, temperature=0, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"Count from {i} to {i + 20}."}]))
            results[i] = chunks
        except Exception as e:  # collected so the assertion shows every failure
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert len(results) == 8
    for i, chunks in results.items():
        assert chunks[0].choices[0].delta.role == "assistant"
        body = [c for c in chunks if c.choices]
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert sum(1 for c in body if c.choices[0].finish_reason) == 1
        usage = chunks[-1].usage
        assert usage is not None and 0 < usage.completion_tokens <= 16 + i
        if body[-1].choices[0].finish_reason == "length":
            assert usage.completion_tokens == 16 + i


def test_worker_killed_mid_stream(two_model_daemon, client):
    """SIGKILL one worker mid-stream: its stream errors, the other model answers, it comes back."""
    victim = two_model_daemon.model_status("smol-b")
    pid = victim["pid"]
    stream = client.chat.completions.create(
        model="smol-b", max_tokens=400, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    got = 0
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got += 1
            if got == 3:
                os.kill(pid, signal.SIGKILL)
    assert "smol-b" in str(e.value) and "SIGKILL" in str(e.value)
    r = client.chat.completions.create(model="smol-a", messages=FRANCE, max_tokens=8, temperature=0)
    assert r.choices[0].message.content
    st = two_model_daemon.wait_restarted("smol-b", pid)
    assert st["restarts"] >= 1
    r = client.chat.completions.create(model="smol-b", messages=FRANCE, max_tokens=8, temperature=0)
    assert r.choices[0].message.content


def test_health(two_model_daemon):
    r = httpx.get(f"{two_model_daemon.url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_metrics_per_model(two_model_daemon, client):
    client.chat.completions.create(model="smol", messages=FRANCE, max_tokens=6, temperature=0)
    text = httpx.get(f"{two_model_daemon.url}/metrics", timeout=10).text
    for name in ("mlxd_time_to_first_token_seconds_bucket", "mlxd_inter_token_latency_seconds_bucket",
                 "mlxd_e2e_request_latency_seconds_count", "mlxd_prompt_tokens_total",
                 "mlxd_generation_tokens_total", "mlxd_request_success_total", "mlxd_num_requests_running",
                 "mlxd_model_state", "mlxd_prefix_cache_queries_total", "mlxd_prefix_cache_bytes"):
        assert f'{name}{{' in text, name
    line = next(l for l in text.splitlines() if l.startswith('mlxd_prompt_tokens_total{model="smol-a"}'))
    assert float(line.split()[-1]) > 0
    assert 'mlxd_model_state{model="smol-b",state="ready"} 1.0' in text
    log = two_model_daemon.tail(200_000)   # one human-readable line per request
    assert "mlxd.requests: smol-a: " in log and " prompt tokens (" in log and "TTFT" in log


def test_prompt_token_ids_outside_the_vocabulary_are_400(client, two_model_daemon):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol-a", prompt=[1, 2, 10**9], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "vocabulary" in e.value.body["message"]
    r = client.completions.create(model="smol-a", prompt=[1, 2, 3], max_tokens=2)
    assert r.usage.prompt_tokens == 3
