"""Prefix cache isolation between API keys and cache salts, through the real daemon.

The prefix cache reports `cached_tokens`, so a client who shares it with another can probe
the other's prompts token by token. With keys configured, each key's entries are its own
(`prefix_cache.share_across_keys: false`, the default); a request's `cache_salt` adds a
namespace of its own. `shared` turns the sharing back on.
"""

from __future__ import annotations

import anthropic
import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from conftest import Daemon, smol

KEY_A, KEY_B, KEY_C = "sk-alice-0123456789", "sk-bob-9876543210", "sk-carol-5555555555"
CODE = "\n".join(f"def g{i}(x):\n    return x * {i} + {i * 3} - (x // {i + 2})\n" for i in range(10))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    sampling = {"temperature": 0.0, "max_tokens": 12}
    with Daemon(tmp_path_factory.mktemp("isolation"), [
        smol("isolated", sampling=sampling),
        smol("shared", sampling=sampling, prefix_cache={"share_across_keys": True}),
    ], server={"auth": {"api_keys": [KEY_A, KEY_B, KEY_C]}}, api_key=KEY_A) as d:
        yield d


def client(d: Daemon, key: str) -> OpenAI:
    return OpenAI(base_url=f"{d.url}/v1", api_key=key, max_retries=0, timeout=300)


def convo(tag: str) -> list[dict]:
    return [{"role": "system", "content": "You are a concise coding assistant."},
            {"role": "user", "content": f"Module {tag}:\n```python\n{CODE}```\nWhat does it define?"}]


def cached(c: OpenAI, model: str, messages: list[dict], **extra) -> tuple[int, int, str]:
    r = c.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                  extra_body=extra or None)
    return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens, r.choices[0].message.content


def test_one_keys_conversation_never_hits_for_another_key(daemon):
    a, b = client(daemon, KEY_A), client(daemon, KEY_B)
    msgs = convo("one")
    first, prompt, answer = cached(a, "isolated", msgs)
    assert first == 0
    again, _, _ = cached(a, "isolated", msgs)
    assert again >= prompt - 1 - 32          # its own key hits (blocks of 32, the last token recomputed)
    # Key B sends the conversation's next turn, key C the very same prompt: never a hit
    # (neither has entries of its own yet: any hit would be A's).
    follow = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And g3?"}]
    assert cached(b, "isolated", follow)[0] == 0
    c = client(daemon, KEY_C)
    assert cached(c, "isolated", msgs)[0] == 0
    assert cached(c, "isolated", msgs)[0] > 0          # C's entries are C's own


def test_a_short_prompt_under_one_block_is_isolated_too(daemon):
    """Under one block the cache looks at memory entries one by one: that path is namespaced as well."""
    a, b = client(daemon, KEY_A), client(daemon, KEY_B)
    prompt = "The capital of France is"
    r = a.completions.create(model="isolated", prompt=prompt, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens < 32
    assert a.completions.create(model="isolated", prompt=prompt, max_tokens=4,
                                temperature=0).usage.prompt_tokens_details.cached_tokens > 0
    assert b.completions.create(model="isolated", prompt=prompt, max_tokens=4,
                                temperature=0).usage.prompt_tokens_details.cached_tokens == 0


def test_the_salt_separates_two_requests_of_one_key(daemon):
    a = client(daemon, KEY_A)
    msgs = convo("salted")
    assert cached(a, "isolated", msgs, cache_salt="tenant-1")[0] == 0
    assert cached(a, "isolated", msgs, cache_salt="tenant-2")[0] == 0
    assert cached(a, "isolated", msgs, cache_salt="tenant-1")[0] > 0
    # The salt separates on a model that shares across keys, too.
    assert cached(a, "shared", msgs, cache_salt="x")[0] == 0
    assert cached(client(daemon, KEY_B), "shared", msgs, cache_salt="x")[0] > 0
    assert cached(client(daemon, KEY_B), "shared", msgs, cache_salt="y")[0] == 0


def test_share_across_keys_shares(daemon):
    msgs = convo("shared")
    assert cached(client(daemon, KEY_A), "shared", msgs)[0] == 0
    assert cached(client(daemon, KEY_B), "shared", msgs)[0] > 0


def test_every_surface_takes_the_salt(daemon):
    a = client(daemon, KEY_A)
    prompt = f"Module messages:\n```python\n{CODE}```\nWhat does it define?"
    ac = anthropic.Anthropic(base_url=daemon.url, api_key=KEY_A, max_retries=0, timeout=300)

    def messages(salt):
        r = ac.messages.create(model="isolated", max_tokens=8, messages=[{"role": "user", "content": prompt}],
                               extra_body={"cache_salt": salt})
        return r.usage.cache_read_input_tokens

    assert messages("m1") == 0
    assert messages("m2") == 0
    assert messages("m1") > 0

    def responses(salt):
        r = a.responses.create(model="isolated", input=prompt + " (responses)", max_output_tokens=8,
                               store=False, extra_body={"cache_salt": salt})
        return r.usage.input_tokens_details.cached_tokens

    assert responses("r1") == 0
    assert responses("r2") == 0
    assert responses("r1") > 0
    r = a.completions.create(model="isolated", prompt=prompt, max_tokens=4, extra_body={"cache_salt": "c1"})
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(BadRequestError) as e:
        cached(a, "isolated", convo("bad"), cache_salt="")
    assert e.value.body["param"] == "cache_salt"
    bad = httpx.post(f"{daemon.url}/v1/messages", headers={"x-api-key": KEY_A}, json={
        "model": "isolated", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "cache_salt": 7})
    assert bad.status_code == 400 and bad.json()["type"] == "error"


def test_a_stored_response_is_its_keys_own(daemon):
    """`previous_response_id` reads the daemon's response store: another key's id is the same
    404 as an unknown one (it must not continue, nor tell that the id exists)."""
    a, b = client(daemon, KEY_A), client(daemon, KEY_B)
    first = a.responses.create(model="isolated", input="Remember the word: walrus.", max_output_tokens=4)

    def follow(c: OpenAI, rid: str) -> NotFoundError:
        with pytest.raises(NotFoundError) as e:
            c.responses.create(model="isolated", input="Which word?", previous_response_id=rid, max_output_tokens=2)
        return e.value

    theirs, unknown = follow(b, first.id), follow(b, "resp_" + "0" * 32)
    assert theirs.body["param"] == unknown.body["param"] == "previous_response_id"
    assert theirs.body["code"] == unknown.body["code"] == "previous_response_not_found"
    assert theirs.message.replace(first.id, "ID") == unknown.message.replace("resp_" + "0" * 32, "ID")
    own = a.responses.create(model="isolated", input="Which word?", previous_response_id=first.id, max_output_tokens=2)
    assert own.previous_response_id == first.id
