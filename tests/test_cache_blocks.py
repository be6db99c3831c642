"""The memory tier in shared blocks, through the real daemon: sessions sharing a prefix keep it
once, evicting one keeps the others' blocks, LRU frees only blocks nothing holds, the budget
counts unique bytes, and every answer served from assembled blocks is the cache-off answer.

One daemon, three workers of the same weights (float32, so a token's KV bytes are known):
`blocks` (32-token blocks, a large budget), `tight` (32-token blocks, a budget of a few hundred
tokens, no disk tier, so an evicted entry is gone) and `plain` (cache off: the reference).
Prompts are token ids, short, so the whole module runs in well under a minute of model time.
"""

from __future__ import annotations

import json

import httpx
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from pydantic import ValidationError

from conftest import TEST_CACHE, Daemon, smol
from daemon.config import PrefixCache as PrefixCacheConfig
from daemon.models import resolve_model
from daemon.worker.cache.prefix import PrefixCache
from tiny_models import tiny_model

BT = 32
SHARED = list(range(1000, 1000 + 10 * BT))        # ten full blocks
TIGHT_TOKENS = 1000     # tight's budget in tokens of KV: two sessions stored beside a running one's 512


def own(seed: int, n: int = 90) -> list[int]:
    """A session's own tokens after the shared prefix (seeded, so sessions differ at once)."""
    return [2000 + (seed * 37 + i * 11) % 3000 for i in range(n)]


def kv_bytes_per_token() -> int:
    """SmolLM2's KV of one token in float32 (keys and values of every layer)."""
    path = resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE).path
    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4


TOK = kv_bytes_per_token()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    sampling = {"temperature": 0.0, "max_tokens": 4}
    with Daemon(tmp_path_factory.mktemp("blocks"), [
        smol("blocks", dtype="float32", sampling=sampling, prefix_cache={"block_tokens": BT, "disk_budget": 0}),
        smol("tight", dtype="float32", sampling=sampling,
             prefix_cache={"block_tokens": BT, "disk_budget": 0, "memory_budget": TIGHT_TOKENS * TOK}),
        smol("plain", dtype="float32", sampling=sampling, prefix_cache={"enabled": False}),
    ]) as d:
        yield d


def complete(d: Daemon, model: str, prompt: list[int], max_tokens: int = 4):
    """The official SDK's completion of token ids, and what the cache served of it."""
    r = d.openai().completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens


def stats(d: Daemon, model: str) -> dict:
    return httpx.get(f"{d.url}/v1/cache/stats", timeout=30).json()["models"][model]


def same_as_plain(d: Daemon, model: str, prompt: list[int]) -> int:
    """Complete on `model` and on the cache-off reference; they must agree. The cached tokens."""
    text, cached = complete(d, model, prompt)
    assert text == complete(d, "plain", prompt)[0], f"{model} with {cached} cached tokens differs from cache-off"
    return cached


def clear(d: Daemon, model: str) -> None:
    httpx.delete(f"{d.url}/v1/cache", params={"model": model}, timeout=30).raise_for_status()


def test_two_sessions_sharing_a_prefix_store_it_once(daemon):
    clear(daemon, "blocks")
    a, b = SHARED + own(1), SHARED + own(2)
    assert same_as_plain(daemon, "blocks", a) == 0
    one = stats(daemon, "blocks")["memory"]
    assert one["unique_bytes"] == one["logical_bytes"] and one["logical_bytes"] % TOK == 0
    n_a = one["logical_bytes"] // TOK                     # prompt and answer, as stored
    assert len(a) < n_a <= len(a) + 4 and one["unique_blocks"] == n_a // BT
    assert same_as_plain(daemon, "blocks", b) == len(SHARED)     # the shared prefix, from a's blocks
    m = stats(daemon, "blocks")["memory"]
    n_b = (m["logical_bytes"] - one["logical_bytes"]) // TOK
    # The ten shared blocks once, then each session's own blocks and tail.
    assert m["entries"] == 2
    assert m["unique_bytes"] == m["bytes"] == (n_a + n_b - len(SHARED)) * TOK < m["logical_bytes"]
    assert m["unique_blocks"] == n_a // BT + n_b // BT - len(SHARED) // BT
    assert m["sharing_ratio"] == round(m["logical_bytes"] / m["unique_bytes"], 3) > 1.5
    assert stats(daemon, "blocks")["disk"]["sharing_ratio"] == 1.0     # the disk tier is off here


def test_a_hit_cut_inside_a_block_answers_as_cold(daemon):
    """A prompt diverging inside a block and inside an entry's tail: a cut of the chain."""
    clear(daemon, "blocks")
    stored = SHARED + own(3)
    same_as_plain(daemon, "blocks", stored)
    inside_block = SHARED[:3 * BT + 17] + [11, 12, 13]
    assert same_as_plain(daemon, "blocks", inside_block) == 3 * BT + 17
    inside_tail = stored[:len(SHARED) + 40] + [5, 6]
    assert same_as_plain(daemon, "blocks", inside_tail) == len(SHARED) + 40
    whole = stored + [7, 8]
    assert same_as_plain(daemon, "blocks", whole) >= len(stored)


def test_evicting_a_session_keeps_the_others_blocks_and_lru_frees_what_nobody_holds(daemon):
    """A 410-token request runs in a 512-token batch cache, which the budget counts: beside it
    only 488 tokens stay stored, one session's 414 and not two sessions' 508."""
    clear(daemon, "tight")
    a, b, c = SHARED + own(4), SHARED + own(5), SHARED + own(6)
    same_as_plain(daemon, "tight", a)
    assert same_as_plain(daemon, "tight", b) == len(SHARED)
    two = stats(daemon, "tight")
    assert two["memory"]["entries"] == 2 and two["memory"]["bytes"] < two["memory"]["logical_bytes"]
    assert same_as_plain(daemon, "tight", c) == len(SHARED)
    three = stats(daemon, "tight")
    # a (the oldest) went while c ran; b's blocks, shared with c, stayed.
    assert three["memory_evictions"] > two["memory_evictions"]
    assert three["memory"]["bytes"] <= TIGHT_TOKENS * TOK
    assert three["memory"]["unique_blocks"] >= len(SHARED) // BT
    assert same_as_plain(daemon, "tight", b) == len(b) - 1      # b whole: its blocks and tail are there
    assert same_as_plain(daemon, "tight", a) == len(SHARED)     # a's own part is gone, the prefix is not
    # A longer unrelated session (a 768-token batch cache) pushes every sharer out: the shared blocks go too.
    clear(daemon, "tight")
    same_as_plain(daemon, "tight", b)
    same_as_plain(daemon, "tight", c)
    d = own(7, 600)
    assert same_as_plain(daemon, "tight", d) == 0
    m = stats(daemon, "tight")["memory"]
    assert m["entries"] == 1 and m["unique_bytes"] == m["logical_bytes"] <= TIGHT_TOKENS * TOK
    assert m["unique_blocks"] == m["logical_bytes"] // TOK // BT       # d's own blocks only
    assert same_as_plain(daemon, "tight", b) == 0


def test_block_tokens_is_a_multiple_of_the_lookup_block():
    """Blocks are addressed by the chained 32-token lookup hash at their end (cache/blocks.py)."""
    with pytest.raises(ValidationError, match="multiple of 32"):
        PrefixCacheConfig(block_tokens=48)
    with pytest.raises(ValidationError):
        PrefixCacheConfig(block_tokens=16)
    assert PrefixCacheConfig(block_tokens=64).block_tokens == 64


# -- in-process, on the real weights: quantized blocks and the untrimmable layouts ----------------

def prefill(model, tokens):
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache, logits[0, -1]


def new_cache(model, tmp_path, **kw):
    return PrefixCache(model, fingerprint="b" * 64, root=tmp_path, memory_budget=1 << 30, disk_budget=0,
                       block_tokens=BT, **kw)


def test_quantized_blocks_are_shared_and_restore(tmp_path):
    """kv_bits: blocks hold the quantized arrays (six per layer) and a hit is dequantized."""
    model = load(str(resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE).path))[0]
    pc = new_cache(model, tmp_path, kv_bits=8)
    short = SHARED[:4 * BT]
    a, b = short + own(1, 20), short + own(2, 20)
    pc.store(a, prefill(model, a)[0])
    pc.store(b, prefill(model, b)[0])
    m = pc.stats()["memory"]
    assert m["unique_blocks"] == 4 and m["unique_bytes"] < m["logical_bytes"]
    cache, n, _ = pc.fetch(b[:100] + [2])
    assert n == 100 and type(cache[0]).__name__ == "KVCache"
    cold = prefill(model, b[:100])[0]
    assert float(mx.max(mx.abs(cache[0].keys[..., :100, :] - cold[0].keys[..., :100, :]))) < 0.1


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_5", "llama"])
def test_a_checkpoint_costs_its_own_state_and_restores_as_cold(arch, tmp_path):
    """An untrimmable model's checkpoint shares its attention KV with its conversation's longer
    entry and keeps its rotating/recurrent layers whole; restored, it decodes as a cold prefill."""
    try:
        m = load(str(tiny_model(arch)))[0]
    except (KeyError, ValueError) as exc:       # an architecture this mlx-lm lacks
        pytest.skip(f"{arch}: {exc}")
    pc = new_cache(m, tmp_path)
    long = list(range(10, 10 + 4 * BT + 20))
    ckpt = long[:2 * BT]
    pc.store(long, prefill(m, long)[0])
    pc.store(ckpt, prefill(m, ckpt)[0])
    e = next(v for v in pc.entries.values() if v.n_tokens == len(ckpt))
    plain = e.mem.layout.plain
    if e.trimmable:          # two full blocks, both the longer entry's: it costs nothing of its own
        longer = next(v for v in pc.entries.values() if v.n_tokens == len(long))
        assert all(plain) and e.mem.own_bytes == 0 and pc.memory_bytes == longer.nbytes
    else:                    # its attention KV shared, its window or recurrent state its own
        assert e.mem.own_bytes < e.nbytes if any(plain) else e.mem.own_bytes == e.nbytes
    cache, n, _ = pc.fetch(ckpt + [1, 2])
    assert n == len(ckpt)
    got = m(mx.array([[1, 2]]), cache=cache)[0, -1]
    np.testing.assert_allclose(np.array(got), np.array(prefill(m, ckpt + [1, 2])[1]), atol=1e-3)
    again, _, _ = pc.fetch(ckpt + [1, 2])             # the restore left the stored entry as it was
    np.testing.assert_allclose(np.array(m(mx.array([[1, 2]]), cache=again)[0, -1]), np.array(got), atol=1e-4)


def test_the_running_requests_kv_counts_in_the_memory_budget(daemon):
    """Issue 23 item 4: stored + running <= budget while a long request runs (its batch cache,
    allocated 256 tokens at a time, pushes the stored entries out), as mlx-lm's
    LRUPromptCache.trim_to(total - active) does."""
    clear(daemon, "tight")
    same_as_plain(daemon, "tight", SHARED + own(8))
    same_as_plain(daemon, "tight", SHARED + own(9))
    before = stats(daemon, "tight")["memory"]
    assert before["entries"] == 2 and before["running_bytes"] == 0
    seen = []
    with daemon.openai().completions.create(model="tight", prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=300,
                                            temperature=0, stream=True) as stream:
        for i, _ in enumerate(stream):
            if i % 20 == 10:
                seen.append(stats(daemon, "tight")["memory"])
    running = [m for m in seen if m["running_bytes"] > 0]
    assert running, seen
    assert all(m["bytes"] + m["running_bytes"] <= m["budget"] for m in running), running
    assert min(m["bytes"] for m in running) < before["bytes"]
    assert stats(daemon, "tight")["memory"]["running_bytes"] == 0      # nothing runs any more
