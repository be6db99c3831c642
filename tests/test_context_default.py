"""The default context length is what memory holds for a full batch; an explicit one is kept.

Unit tests of the choice on the real configs of the models the suite uses (the KV shape of
plain, sliding, hybrid and linear-attention models), then the real daemon: under a memory
budget a worker's limit is below the model's 8192, said in the log, and enforced as a 400;
an explicit `engine.context_length` wins over the budget.
"""

from __future__ import annotations

import json

import httpx

from conftest import MODELS_CACHE, TEST_CACHE, Daemon, smol
from daemon.worker.context import FLOOR, STEP, choose, kv_bytes_per_token, text_config

GiB = 2 ** 30


def config_of(prefix: str) -> dict:
    for root in (TEST_CACHE / "tiny", MODELS_CACHE):
        for d in sorted(root.glob(f"{prefix}*")) if root.exists() else []:
            if (d / "config.json").exists():
                return text_config(d)
    raise AssertionError(f"no cached model {prefix}* (the suite's other tests build them)")


def test_kv_bytes_per_token_from_real_configs():
    smol_cfg = json.loads(next(p for p in MODELS_CACHE.glob("*-float32-v2/config.json")
                               if json.loads(p.read_text()).get("model_type") == "llama").read_text())
    assert kv_bytes_per_token(smol_cfg, 4) == 30 * 3 * 64 * 2 * 4          # SmolLM2: every layer attends
    # layer_types: conv layers (LFM2) hold no KV; sliding ones (gpt-oss) count as full, an upper bound.
    assert kv_bytes_per_token(config_of("lfm2-"), 2) == 1 * 2 * (128 // 4) * 2 * 2
    assert kv_bytes_per_token(config_of("gpt_oss-"), 2) == 4 * 2 * 32 * 2 * 2
    assert kv_bytes_per_token(config_of("qwen3_5-"), 2) == 1 * 2 * 32 * 2 * 2    # one layer in 4 is full attention
    assert kv_bytes_per_token({"model_type": "x"}, 2) is None


def test_the_choice():
    kw = dict(explicit=None, model_max=131072, kv_per_token=128 << 10, batch=8, weights=4 * GiB,
              cache_memory=1 * GiB, budget_named=True)
    c = choose(memory=16 * GiB, **kw)
    assert c.tokens == (11 * GiB) // (8 * (128 << 10)) // STEP * STEP == 11264
    assert c.tokens * 8 * (128 << 10) <= 11 * GiB < (c.tokens + STEP) * 8 * (128 << 10)
    assert "server.memory_budget 16.0 GiB" in c.why and "11264 tokens for each of 8 requests" in c.why
    assert choose(memory=1024 * GiB, **kw).tokens == 131072                  # capped at the model's own
    low = choose(memory=5 * GiB, **kw)                                       # nothing left after weights + cache
    assert low.tokens == FLOOR and "lower engine.max_batch_size or set engine.context_length" in low.why
    assert choose(memory=5 * GiB, **{**kw, "model_max": 2048}).tokens == 2048
    assert choose(memory=5 * GiB, **{**kw, "explicit": 200000}).tokens == 200000   # the user's choice
    assert "machine" in choose(memory=16 * GiB, **{**kw, "budget_named": False}).why
    assert choose(memory=16 * GiB, **{**kw, "kv_per_token": None}).tokens == 131072


def refusal(d: Daemon, n: int) -> httpx.Response:
    """A prompt of n token ids: refused for its length before any compute."""
    return httpx.post(d.url + "/v1/completions", json={"model": "m", "prompt": [1] * n, "max_tokens": 1}, timeout=120)


def test_a_workers_default_limit_fits_the_memory_budget_and_an_explicit_one_is_kept(tmp_path):
    engine = {"max_batch_size": 2}
    cache = {"memory_budget": "64MiB"}
    budget = 1200 * 10 ** 6
    with Daemon(tmp_path, [smol("m", engine=engine, prefix_cache=cache)], server={"memory_budget": budget}) as d:
        info = d.model_status("m")["worker"]
        n, kv = info["context_length"], info["kv_bytes_per_token"]
        assert kv == 30 * 3 * 64 * 2 * 4, info                     # SmolLM2 in float32 on this CPU
        room = budget - info["mlx_memory_bytes"] - 64 * 2 ** 20
        assert FLOOR < n < 8192 and n % STEP == 0, info            # below the model's own 8192
        assert n * 2 * kv <= room < (n + STEP) * 2 * kv, info        # a full batch fits; one step more does not
        assert f"context length {n}" in d.tail(100_000) and "server.memory_budget" in d.tail(100_000)
        r = refusal(d, n + 1)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert f"maximum context length is {n} tokens" in r.json()["error"]["message"]

        pid = d.model_status("m")["pid"]
        d.write_config([smol("m", engine={**engine, "context_length": 8192}, prefix_cache=cache)],
                       server={"memory_budget": budget})
        assert httpx.post(d.url + "/admin/reload", timeout=60).json()["applied"]
        info = d.wait_restarted("m", pid)["worker"]
        assert info["context_length"] == 8192, info                 # the user's choice, whatever it costs
        r = refusal(d, 8193)
        assert r.status_code == 400 and "maximum context length is 8192 tokens" in r.json()["error"]["message"]
