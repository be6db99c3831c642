"""Prompt-lookup speculative decoding through the real daemon: `spec` and `plain` serve the same
weights, with speculation on and off; every greedy answer of `spec` must equal `plain`'s.

The prompts ask SmolLM2 to repeat code given in the prompt, so drafts are found and accepted;
each test checks the acceptance counters moved, or it would prove nothing about speculation.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from openai import OpenAI

from conftest import Daemon, smol

# Rows draft together while at most 4 decode, so a batch of 8 goes through drafting in a batch,
# the switch to one token a step (rows realigned) and back.
SPEC = {"mode": "prompt_lookup", "max_draft": 8, "ngram": [2, 16], "max_sequences": 4}


def code(name: str, arg: str) -> str:
    return (f"def {name}(urls, session, timeout=10, {arg}=3):\n"
            "    results = {}\n    errors = []\n    for url in urls:\n"
            f"        for attempt in range({arg}):\n            try:\n"
            "                response = session.get(url, timeout=timeout)\n"
            "                response.errors = []()\n                results[url] = response.json()\n"
            "                break\n            except Exception as exc:\n"
            f"                if attempt == {arg} - 1:\n                    errors.append((url, str(exc)))\n"
            "    return results, errors\n")


def repeat(name: str = "fetch_all", arg: str = "retries") -> list[dict]:
    return [{"role": "user", "content": f"Here is a Python function:\n\n```python\n{code(name, arg)}```\n\n"
                                        "Repeat the function exactly. Output only the code."}]


PROMPTS = [repeat(n, a) for n, a in [("fetch_all", "retries"), ("load_pages", "tries"), ("get_many", "limit"),
                                      ("collect", "rounds"), ("download", "retries"), ("pull_json", "times"),
                                      ("scan_urls", "budget"), ("gather", "attempts_max")]]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    engine = {"max_batch_size": 8}
    with Daemon(tmp_path_factory.mktemp("spec"), [
        smol("spec", engine={**engine, "speculative": SPEC}, sampling={"temperature": 0.0, "max_tokens": 48}),
        smol("plain", engine=engine, sampling={"temperature": 0.0, "max_tokens": 48}),
    ]) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    return daemon.openai(timeout=600)


def chat(c: OpenAI, model: str, messages: list[dict], **kw):
    r = c.chat.completions.create(model=model, messages=messages, temperature=0, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


def counters(d: Daemon) -> dict:
    return d.model_status("spec")["speculative"]


def accepted_after(d: Daemon, before: dict, timeout: float = 15) -> dict:
    """The counters once the worker's next stats show more accepted tokens than `before`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = counters(d)
        if now["accepted_tokens"] > before["accepted_tokens"]:
            return now
        time.sleep(0.3)
    raise AssertionError(f"no draft token was accepted: {before} -> {counters(d)}")


def test_greedy_output_is_identical_alone(daemon, client):
    before = counters(daemon)
    for messages in PROMPTS[:3]:
        want = chat(client, "plain", messages)
        got = chat(client, "spec", messages)
        assert got[:2] == want[:2]
        assert got[2].completion_tokens == want[2].completion_tokens
    after = accepted_after(daemon, before)
    assert after["draft_tokens"] >= after["accepted_tokens"] > before["accepted_tokens"]


def stream_text(c: OpenAI, model: str, messages: list[dict], started: threading.Event | None = None, **kw) -> str:
    text = ""
    for chunk in c.chat.completions.create(model=model, messages=messages, temperature=0, stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            if started is not None:
                started.set()
    return text


def run_all(c: OpenAI, model: str, prompts: list[list[dict]], stagger: int = 0) -> list[str]:
    """Every prompt streamed at once; with `stagger`, the first `stagger` are decoding before the rest join."""
    out: list = [None] * len(prompts)
    started = [threading.Event() for _ in prompts]

    def one(i):
        out[i] = stream_text(c, model, prompts[i], started[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for i, t in enumerate(threads):
        if i == stagger and stagger:
            assert all(e.wait(300) for e in started[:stagger])
        t.start()
    for t in threads:
        t.join(600)
    return out


def test_greedy_output_is_identical_in_a_batch_of_8_with_requests_joining(daemon, client):
    want = run_all(client, "plain", PROMPTS)
    before = counters(daemon)
    got = run_all(client, "spec", PROMPTS, stagger=4)
    assert got == want
    accepted_after(daemon, before)


def test_stop_string_inside_an_accepted_draft_stops_where_it_would_have(daemon, client):
    messages = PROMPTS[0]
    full, _, _ = chat(client, "plain", messages)
    assert "errors = []" in full, full      # the stop string sits in the repeated code
    want = chat(client, "plain", messages, stop=["errors = []"])
    before = counters(daemon)
    got = chat(client, "spec", messages, stop=["errors = []"])
    assert got[:2] == want[:2] and got[1] == "stop"
    assert got[2].completion_tokens == want[2].completion_tokens
    accepted_after(daemon, before)


def test_max_tokens_is_never_exceeded(daemon, client):
    before = counters(daemon)
    for n in (1, 2, 7, 19):
        want = chat(client, "plain", PROMPTS[1], max_tokens=n)
        got = chat(client, "spec", PROMPTS[1], max_tokens=n)
        assert got[2].completion_tokens == n and got[1] == "length"
        assert got[:2] == want[:2]
    accepted_after(daemon, before)


def test_cancel_during_verify_frees_the_slot(daemon, client):
    pid = daemon.model_status("spec")["pid"]
    before = counters(daemon)
    for _ in range(2):
        stream = client.chat.completions.create(model="spec", messages=PROMPTS[2], temperature=0, stream=True,
                                                max_tokens=400)
        n = 0
        for chunk in stream:
            n += bool(chunk.choices and chunk.choices[0].delta.content)
            if n >= 12:          # well into the repeated code: drafts being verified
                break
        stream.close()
    deadline = time.monotonic() + 60
    while daemon.model_status("spec")["requests_running"] or daemon.model_status("spec")["requests_in_flight"]:
        assert time.monotonic() < deadline, daemon.model_status("spec")
        time.sleep(0.3)
    accepted_after(daemon, before)
    assert chat(client, "spec", PROMPTS[0], max_tokens=8)[1] == "length"
    assert daemon.model_status("spec")["pid"] == pid


def test_prefix_cache_stores_the_same_tokens_as_without(daemon, client):
    """The next turn reuses exactly as many tokens (prompt + the whole answer) with and without."""
    first = PROMPTS[3]
    reuse = {}
    for model in ("plain", "spec"):
        answer, _, usage = chat(client, model, first)
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now shorter."}]
        _, _, usage2 = chat(client, model, follow, max_tokens=2)
        reuse[model] = (answer, usage.prompt_tokens, usage.completion_tokens, usage2.prompt_tokens_details.cached_tokens)
    assert reuse["spec"] == reuse["plain"]
    assert reuse["spec"][3] > reuse["spec"][1]       # the answer itself was reused


def test_seeded_sampling_is_reproducible(daemon, client):
    """Drafts accepted by sampling (not argmax): a seed repeats its draw, other seeds draw
    otherwise, and neither is the greedy answer."""
    before = counters(daemon)
    kw = dict(model="spec", messages=PROMPTS[4], max_tokens=40)

    def ask(**more) -> str:
        return client.chat.completions.create(**kw, **more).choices[0].message.content

    greedy = ask(temperature=0)
    draws = [ask(temperature=1.0, seed=s) for s in range(4)]
    assert ask(temperature=1.0, seed=2) == draws[2] and draws[2]
    assert len(set(draws) - {greedy}) >= 2, (greedy, draws)
    accepted_after(daemon, before)


def test_counters_in_metrics_and_status(daemon, client):
    chat(client, "spec", PROMPTS[5], max_tokens=24)
    st = counters(daemon)
    assert st["accepted_tokens"] > 0 and st["acceptance_rate"] == round(st["accepted_tokens"] / st["draft_tokens"], 4)
    assert daemon.model_status("plain")["speculative"] is None
    text = httpx.get(f"{daemon.url}/metrics", timeout=30).text
    lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln.startswith("mlxd_spec_")}
    assert lines['mlxd_spec_draft_tokens_total{model="spec"}'] >= lines['mlxd_spec_accepted_tokens_total{model="spec"}'] > 0
    assert not any('model="plain"' in k for k in lines)
