"""The prefix cache on every cache layout people run: sliding windows, recurrent state, thinking templates.

One daemon serves a tiny random-weight model of each family (`tiny_models.py`: llama as the
control, gemma3_text and gpt_oss with wrapped windows, qwen3_5 and lfm2 with recurrent
layers), each under plain ChatML and under Qwen3's thinking template, which drops past
reasoning. Every follow-up turn must be served from the cache for what it shares with the
previous prompt (`chat_reuse.py`), in memory and from disk after a restart, and greedy
answers after a hit must be the cold answers.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chat_reuse import Chat, Renderer, Turn, shared_prefix, user_message
from conftest import Daemon
from daemon.events import CACHE_MISS_REASONS as REASONS
from tiny_models import ARCHS, thinking_template, tiny_model

TEMPLATES = ("chatml", "think")
TRIMMABLE = {"llama"}          # every other family's cache cannot be cut back once its window wraps
MODELS = [(arch, t) for arch in ARCHS for t in TEMPLATES]
TURNS = 6
# About 250 new tokens a turn: a ~150-token question and a 96-token answer (decoding is the cost).
USER_WORDS, ANSWER_TOKENS = 150, 96
MIN_REUSE = 0.95
TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file of the project.",
                                      "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                     "required": ["path"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the project for a string.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                     "required": ["query"]}}},
]


def name(arch: str, template: str) -> str:
    return f"{arch}-{template}"


def template_of(arch: str, template: str):
    return thinking_template(arch) if template == "think" else None


def entry(arch: str, template: str) -> dict:
    m = {"name": name(arch, template), "source": str(tiny_model(arch)),
         "sampling": {"temperature": 0.0, "max_tokens": 128}, "engine": {"max_batch_size": 4}}
    if template == "think":
        m["chat_template"] = str(template_of(arch, template))
    return m


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("hybrid"), [entry(a, t) for a, t in MODELS]) as d:
        yield d


@pytest.fixture(scope="module")
def renderers():
    return {(a, t): Renderer(tiny_model(a), template_of(a, t)) for a, t in MODELS}


def each(fn, items):
    """fn(item) for every item at once (each model has its own worker), results in order."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def cache_stats(d: Daemon) -> dict:
    return httpx.get(f"{d.url}/v1/cache/stats", timeout=60).json()["models"]


def wait_for_writes(d: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = cache_stats(d)
        if all(s["disk"]["pending_writes"] == 0 for s in stats.values()):
            return
        time.sleep(0.1)
    raise TimeoutError(stats)


def clear(d: Daemon, model: str) -> None:
    httpx.delete(f"{d.url}/v1/cache", params={"model": model}, timeout=60).raise_for_status()


def misses(d: Daemon) -> Counter:
    """mlxd_prefix_cache_misses_total by (model, reason)."""
    text = httpx.get(f"{d.url}/metrics", timeout=30).text
    out = Counter()
    for model, reason, n in re.findall(
            r'^mlxd_prefix_cache_misses_total\{model="([^"]+)",reason="([^"]+)"\} ([0-9.e+]+)$', text, re.M):
        out[model, reason] = int(float(n))
    return out


def expect_misses(got: Counter, expected: dict, what: str) -> None:
    """expected: {model: {reason: count}}; a reason not named must not have been counted."""
    wrong = {m: {r: got[m, r] for r in REASONS if got[m, r] != want.get(r, 0)} for m, want in expected.items()}
    wrong = {m: w for m, w in wrong.items() if w}
    assert not wrong, f"{what}: miss reasons counted {wrong}, expected {expected}"


def served_short(arch: str, prev: Turn, cur: Turn) -> bool:
    """Whether `cur` was served less than the previous turn's entry (its prompt + answer) shares
    with it, which is a miss with reason "untrimmable" (nothing else was evicted or lost). Where
    `cur` leaves the previous prompt inside it (a thinking template drops the reasoning from the
    opener on), the entry shares what the prompts share; where it extends all of it (ChatML), the
    entry shares at least that, which an untrimmable cache, served at a checkpoint before the
    prompt's end, never reaches. A trimmable cache is always cut to exactly what is shared."""
    if arch in TRIMMABLE:
        return False
    return cur.shared == len(prev.prompt) or cur.cached < cur.shared


def table(chats: dict) -> str:
    rows = [f"{name(*k):22s} " + " ".join("  -  " if r is None else f"{r:5.2f}" for r in c.reuse())
            for k, c in chats.items()]
    return "reuse per turn (cached / shared with the previous prompt):\n" + "\n".join(rows)


def test_six_turn_chats_reuse_each_previous_prompt_across_a_restart(daemon, renderers):
    """Turns 2-5 hit the memory tier, turn 6 the disk tier after a restart; each serves >= 95%
    of what it shares with the previous prompt, and its greedy answer is the cold one."""
    client = daemon.openai()
    chats = {k: Chat(client, name(*k), renderers[k], seed="/".join(k), max_tokens=ANSWER_TOKENS,
                     system=f"{name(*k)} is you, an assistant. Answer every question in full.")
             for k in MODELS}
    each(lambda c: c.turn(USER_WORDS), list(chats.values()))
    # The first turn finds nothing: cold, and nothing else.
    expect_misses(misses(daemon), {name(*k): {"cold": 1} for k in MODELS}, "first turns")
    each(lambda c: [c.turn(USER_WORDS) for _ in range(TURNS - 2)], list(chats.values()))
    follow = {name(a, t): Counter(cold=1) for a, t in MODELS}
    for (a, t), c in chats.items():
        follow[name(a, t)]["untrimmable"] = sum(served_short(a, prev, cur) for prev, cur in zip(c.turns, c.turns[1:]))
    expect_misses(misses(daemon), follow, "turns 2-5")
    wait_for_writes(daemon)
    daemon.stop()
    daemon.start()
    client = daemon.openai()
    for c in chats.values():
        c.client = client
    each(lambda c: c.turn(USER_WORDS), list(chats.values()))
    print(table(chats))

    low = {name(*k): [round(r, 2) for r in c.reuse()[1:]] for k, c in chats.items()
           if any(r < MIN_REUSE for r in c.reuse()[1:])}
    assert not low, f"follow-ups below {MIN_REUSE}: {low}\n{table(chats)}"
    after = misses(daemon)       # a new daemon: its counters start again
    for k in MODELS:
        assert not any(after[name(*k), r] for r in ("cold", "evicted", "unreadable", "unshared")), \
            (name(*k), {r: after[name(*k), r] for r in REASONS})

    def cold(c: Chat):
        """The last turn (a disk hit) and the one before (a memory hit), asked again with no cache."""
        out = []
        for i in (TURNS - 1, TURNS - 2):
            clear(daemon, c.model)
            again = c.send(c.messages[: 2 + 2 * i])     # system, then turn i's user message last
            out.append((i, again.cached, (again.text, again.reasoning) == (c.turns[i].text, c.turns[i].reasoning)))
        return out

    before = misses(daemon)
    for k, res in zip(chats, each(cold, list(chats.values()))):
        for i, cached, same in res:
            assert cached == 0, (name(*k), i, "not cold")
            assert same, f"{name(*k)} turn {i + 1}: the answer after a cache hit differs from the cold one"
    got = misses(daemon)
    for k in MODELS:      # a cleared cache is not an eviction by the budgets
        assert got[name(*k), "cold"] - before[name(*k), "cold"] == 2, (name(*k), got)


def test_a_second_session_reuses_the_system_prompt_checkpoint(daemon, renderers):
    """Two sessions with one system prompt and tools, different first questions: the second is
    served the whole system prompt (the checkpoint at its end, for untrimmable models)."""
    client = daemon.openai()
    system = "You are a coding agent working in a repository. " + user_message("agent system prompt", 260)

    def sessions(k):
        # Both templates' workers of one family share its disk namespace: their system prompts
        # differ from the first word, so neither finds the other's entries.
        first, second = (Chat(client, name(*k), renderers[k], system=f"{k[1]}: {system}", tools=TOOLS, max_tokens=8,
                              seed=s)
                         for s in (f"{name(*k)}/a", f"{name(*k)}/b"))
        a, b = first.turn(), second.turn()
        b.shared = shared_prefix(a.prompt, b.prompt)
        return a, b

    for k in MODELS:          # the first session finds nothing (not even "<|im_start|>system" of another chat)
        clear(daemon, name(*k))
    before = misses(daemon)
    results = each(sessions, MODELS)
    got = misses(daemon)
    # The first session is cold; the second leaves the first's prompt inside it, so it misses
    # only if an untrimmable cache was served short of what the prompts share.
    expect_misses(got - before, {name(a, t): {"cold": 1, "untrimmable": int(a not in TRIMMABLE and b.cached < b.shared)}
                                 for (a, t), (_, b) in zip(MODELS, results)}, "two sessions")
    low = {}
    for k, (a, b) in zip(MODELS, results):
        shared = b.shared
        assert shared > 300, (name(*k), shared)        # the system prompt and tools are most of it
        if b.cached / shared < MIN_REUSE:
            low[name(*k)] = (b.cached, shared)
    assert not low, f"second sessions served less than {MIN_REUSE} of the shared system prompt: {low}"
