"""The prefix cache through the real daemon: hits, restarts, corruption, fingerprints, budgets, kills.

`plain` serves the same weights with the cache off; it is the reference every cached
answer must equal (greedy decoding).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

import shutil

from conftest import TEST_CACHE, Daemon, smol

CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * 7} - (x // {i + 1})\n" for i in range(12))
QUESTIONS = ["What does f3 return for x=2?", "Which function adds the largest constant?",
             "Rewrite f1 as a lambda.", "What is f0(10)?"]


def models(**cached_over):
    return [
        smol("cached", sampling={"temperature": 0.0, "max_tokens": 24}, **cached_over),
        smol("plain", sampling={"temperature": 0.0, "max_tokens": 24}, prefix_cache={"enabled": False}),
    ]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("prefix"), models()) as d:
        yield d


def client_for(d: Daemon) -> OpenAI:
    return d.openai()


def chat(c: OpenAI, model: str, messages: list[dict], max_tokens: int = 24):
    r = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, r.usage


def turn(messages, question):
    return messages + [{"role": "user", "content": question}]


def namespace_files(d: Daemon, suffix: str = ".safetensors") -> list[Path]:
    return sorted((d.cache_dir / "prefix").glob(f"*/*{suffix}"))


def cache_stats(d: Daemon, model: str = "cached") -> dict:
    return httpx.get(f"{d.url}/v1/cache/stats", timeout=30).json()["models"][model]


def wait_for_writes(d: Daemon, model: str = "cached", timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = cache_stats(d, model)
        if s["disk"]["pending_writes"] == 0:
            return s
        time.sleep(0.1)
    raise TimeoutError(s)


def conversation(c: OpenAI, turns: int, seed: int = 0):
    """A coding chat: code pasted once, then questions; yields each turn's (answer, usage, plain answer)."""
    msgs = [{"role": "system", "content": "You are a concise coding assistant."},
            {"role": "user", "content": f"Here is my module {seed}:\n```python\n{CODE}```\nWhat does it define?"}]
    out = []
    for i in range(turns):
        got, usage = chat(c, "cached", msgs)
        ref, _ = chat(c, "plain", msgs)
        out.append((got, usage, ref, list(msgs)))
        msgs = turn(msgs + [{"role": "assistant", "content": ref}], QUESTIONS[(i + seed) % len(QUESTIONS)])
    return out, msgs


def test_follow_up_hits_and_output_is_identical(daemon):
    c = client_for(daemon)
    turns, _ = conversation(c, 3)
    for got, _, ref, _ in turns:
        assert got == ref
    first, second, third = (t[1] for t in turns)
    assert first.prompt_tokens_details.cached_tokens == 0
    # The previous turn's prompt + answer is cached; only the template glue and the new question are not.
    for prev, cur in ((first, second), (second, third)):
        assert cur.prompt_tokens_details.cached_tokens >= prev.prompt_tokens + prev.completion_tokens - 4
    stats = cache_stats(daemon)
    assert stats["hits"] >= 2 and stats["hit_tokens"] >= second.prompt_tokens_details.cached_tokens


def test_cached_prefix_of_a_longer_entry_is_trimmed(daemon):
    """A request that is a prefix of a cached conversation reuses it (trimmed), same output."""
    c = client_for(daemon)
    msgs = [{"role": "user", "content": f"Summarize:\n{CODE}"}]
    chat(c, "cached", msgs)
    edited = [{"role": "user", "content": f"Summarize:\n{CODE[: len(CODE) // 2]}"}]
    got, usage = chat(c, "cached", edited)
    ref, ref_usage = chat(c, "plain", edited)
    assert got == ref
    assert 0 < usage.prompt_tokens_details.cached_tokens < ref_usage.prompt_tokens


def test_a_cached_follow_up_joins_a_running_batch(daemon):
    """Continuous batching and the cache together: a follow-up arriving while another request
    decodes joins that batch with its prefix from the cache, and both finish."""
    c = client_for(daemon)
    msgs = [{"role": "user", "content": f"Explain this module:\n{CODE}"}]
    answer, first = chat(c, "cached", msgs)
    follow_up = turn(msgs + [{"role": "assistant", "content": answer}], QUESTIONS[0])
    hits_before = cache_stats(daemon)["hit_tokens"]

    long_chunks: list[float] = []
    stream = c.chat.completions.create(model="cached", stream=True, max_tokens=200, temperature=0,
                                       messages=[{"role": "user", "content": "Count from 1 to 100, one per line."}])
    it = iter(stream)
    next(it)                                                   # the long request is in the batch
    reader = threading.Thread(target=lambda: long_chunks.extend(time.monotonic() for _ in it))
    reader.start()
    _, usage = chat(c, "cached", follow_up)
    follow_up_done = time.monotonic()
    reader.join(300)
    assert usage.prompt_tokens_details.cached_tokens >= first.prompt_tokens + first.completion_tokens - 4
    assert long_chunks and long_chunks[-1] > follow_up_done, "the long request was not still decoding"
    assert cache_stats(daemon)["hit_tokens"] - hits_before >= usage.prompt_tokens_details.cached_tokens


def test_a_conversation_keeps_only_its_last_snapshot(daemon):
    """Turn N's entry serves every earlier turn's prefix (trimmed), so it replaces them: a long
    chat costs the disk one snapshot, not the sum of all. A branch from an earlier turn still hits."""
    c = client_for(daemon)
    before = wait_for_writes(daemon)
    turns, _ = conversation(c, 3, seed=7)
    after = wait_for_writes(daemon)
    assert after["disk"]["entries"] - before["disk"]["entries"] == 1
    assert after["disk"]["superseded"] - before["disk"]["superseded"] == 2

    first_usage, first_msgs = turns[0][1], turns[0][3]
    branch = turn(first_msgs + [{"role": "assistant", "content": turns[0][2]}], "Explain f5 instead.")
    got, usage = chat(c, "cached", branch)
    ref, _ = chat(c, "plain", branch)
    assert got == ref
    assert usage.prompt_tokens_details.cached_tokens >= first_usage.prompt_tokens + first_usage.completion_tokens - 4


def test_restart_keeps_the_cache_and_corrupt_files_are_discarded(tmp_path):
    d = Daemon(tmp_path, models())
    d.start()
    try:
        c = client_for(d)
        _, other_msgs = conversation(c, 1, seed=1)     # a second conversation: a second file
        turns, next_msgs = conversation(c, 2)
        last = turns[-1][1]
        wait_for_writes(d)
        d.stop()
        d.start()
        got, usage = chat(c, "cached", next_msgs)
        ref, _ = chat(c, "plain", next_msgs)
        assert got == ref
        assert usage.prompt_tokens_details.cached_tokens >= last.prompt_tokens + last.completion_tokens - 4
        assert cache_stats(d)["disk_hit_tokens"] > 0
        wait_for_writes(d)

        # Corrupt every entry: flip one bit in one, truncate the other.
        d.stop()
        files = namespace_files(d)
        assert len(files) == 2
        for i, f in enumerate(files):
            data = bytearray(f.read_bytes())
            if i % 2:
                data[len(data) // 2] ^= 0x10
                f.write_bytes(bytes(data))
            else:
                f.write_bytes(bytes(data[: len(data) - 1000]))
        d.start()
        follow = turn(next_msgs + [{"role": "assistant", "content": got}], "Thanks. Anything else?")
        for msgs in (follow, other_msgs):
            got, usage = chat(c, "cached", msgs)
            ref, _ = chat(c, "plain", msgs)
            assert got == ref
            # The damaged entries held nearly the whole prompt; at most the system prompt that
            # `follow` (stored just now) shares with the other conversation may hit.
            assert usage.prompt_tokens_details.cached_tokens < 32
        stats = wait_for_writes(d)
        assert stats["disk"]["corrupt"] == 2
        # The damaged entries are gone, file and record; a file under a damaged name is only
        # ever a sound entry written since (its record's size and CRC-32 match its bytes).
        for f in files:
            record = f.with_suffix(".json")
            if f.exists() or record.exists():
                assert sound(f), f
    finally:
        d.stop()


def sound(f: Path) -> bool:
    """An entry as the disk format defines one: a record whose size and CRC-32 are its file's."""
    try:
        record, data = json.loads(f.with_suffix(".json").read_text()), f.read_bytes()
    except (OSError, ValueError):
        return False
    return record["size"] == len(data) and record["crc32"] == zlib.crc32(data)


def test_changed_fingerprint_ignores_the_old_cache(tmp_path):
    """New weights at the same path (an MLX directory edited in place) never read the old KV."""
    import mlx.core as mx
    from daemon.models import resolve_model

    src = resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE).path
    mine = tmp_path / "my-model"
    shutil.copytree(src, mine)
    d = Daemon(tmp_path, [smol("cached", source=str(mine), sampling={"temperature": 0.0, "max_tokens": 8})])
    d.start()
    try:
        c = client_for(d)
        msgs = [{"role": "user", "content": f"Here is my module:\n{CODE}\nWhat does it define?"}]
        chat(c, "cached", msgs)
        assert chat(c, "cached", msgs)[1].prompt_tokens_details.cached_tokens > 0
        wait_for_writes(d)
        d.stop()
        weights = mine / "model.safetensors"
        tensors = mx.load(str(weights))
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.001
        mx.save_safetensors(str(weights), tensors, metadata={"format": "mlx"})
        d.start()
        _, usage = chat(c, "cached", msgs)
        assert usage.prompt_tokens_details.cached_tokens == 0
        # ... and the miss says why: the old revision's cache would have served it.
        metrics = httpx.get(f"{d.url}/metrics", timeout=30).text
        assert 'mlxd_prefix_cache_misses_total{model="cached",reason="revision"} 1.0' in metrics
        assert 'mlxd_prefix_cache_misses_total{model="cached",reason="cold"} 0.0' in metrics
        wait_for_writes(d)
        assert len({p.parent.name for p in namespace_files(d)}) == 2
    finally:
        d.stop()


def test_disk_budget_is_respected(tmp_path):
    budget = 10_000_000     # f32 KV is ~46 KB a token here: room for three or four of these entries
    d = Daemon(tmp_path, models(prefix_cache={"disk_budget": budget, "memory_budget": budget}))
    d.start()
    try:
        c = client_for(d)
        for i in range(8):
            chat(c, "cached", [{"role": "user", "content": f"Prompt {i}: explain this.\n{CODE[: 60 + 10 * i]}"}],
                 max_tokens=4)
        stats = wait_for_writes(d)
        on_disk = sum(f.stat().st_size for f in namespace_files(d))
        assert 0 < on_disk <= budget
        assert stats["disk"]["bytes"] == on_disk
        assert stats["disk"]["evictions"] >= 1
        assert stats["memory"]["bytes"] <= budget
    finally:
        d.stop()


def kill_when_writing(d: Daemon, pid: int, timeout: float = 120) -> threading.Event:
    """SIGKILL `pid` the moment a temp file of the cache appears, so the kill lands mid-write
    whatever the disk's speed (a check after the answer raced the writer and lost on a quiet box)."""
    killed = threading.Event()

    def watch():
        deadline = time.monotonic() + timeout
        root, mine = d.cache_dir / "prefix", f".tmp.{pid}"   # not a temp file an earlier kill left
        while time.monotonic() < deadline:
            if any(mine in f.name for ns in listdirs(root) for f in listdirs(ns)):
                os.kill(pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def listdirs(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except OSError:                  # not there yet, or removed meanwhile
        return []


def test_kill_while_writing_leaves_nothing_that_loads_wrong(tmp_path):
    d = Daemon(tmp_path, models())
    d.start()
    try:
        c = client_for(d)
        prompts = [[{"role": "user", "content": f"Variant {k}.\n{CODE * 2}"}] for k in range(2)]
        for msgs in prompts:
            pid = d.model_status("cached")["pid"]
            killed = kill_when_writing(d, pid)
            try:
                chat(c, "cached", msgs, max_tokens=2)
            except openai.APIError:
                pass                 # the kill came before the answer left the worker: the same cut
            assert killed.wait(60), "no write in flight to kill"
            d.wait_restarted("cached", pid)
        for msgs in prompts:
            got, usage = chat(c, "cached", msgs, max_tokens=12)
            ref, _ = chat(c, "plain", msgs, max_tokens=12)
            assert got == ref
        stats = cache_stats(d)
        assert stats["disk"]["corrupt"] == 0
        assert not list((d.cache_dir / "prefix").glob("*/*.tmp*"))
    finally:
        d.stop()


def test_kv_quantized_entries_agree_closely(tmp_path):
    """8-bit KV for stored entries: the answers we measured agree with exact KV on this model."""
    d = Daemon(tmp_path, models(prefix_cache={"kv_bits": 8}))
    d.start()
    try:
        c = client_for(d)
        turns, _ = conversation(c, 2)
        got, usage, ref, _ = turns[1]
        assert usage.prompt_tokens_details.cached_tokens > 0
        # Measured: identical for these prompts. Allow divergence only late in the answer.
        common = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        assert common >= min(len(ref), 40)
    finally:
        d.stop()


def test_cache_stats_and_clear(daemon):
    c = client_for(daemon)
    chat(c, "cached", [{"role": "user", "content": "Say hi."}], max_tokens=4)
    wait_for_writes(daemon)
    stats = cache_stats(daemon)
    assert stats["entries"] >= 1 and stats["disk"]["entries"] >= 1 and stats["memory"]["bytes"] > 0
    r = httpx.delete(f"{daemon.url}/v1/cache", params={"model": "cached"}, timeout=30)
    assert r.status_code == 200 and r.json()["cleared_entries"] >= 1
    stats = cache_stats(daemon)
    assert stats["entries"] == 0 and stats["disk"]["entries"] == 0 and stats["memory"]["bytes"] == 0
    assert httpx.delete(f"{daemon.url}/v1/cache", params={"model": "nope"}, timeout=30).status_code == 404
    assert httpx.delete(f"{daemon.url}/v1/cache", timeout=30).status_code == 400
