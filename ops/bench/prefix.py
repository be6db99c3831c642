"""Prefix-cache benchmark: mlxd vs mlx_lm.server vs vllm-mlx vs the compute floor, in one run.

(a) A multi-turn coding chat (each turn pastes ~450 tokens of Python and asks about it;
    the greedy 32-token reply is appended) growing past 4K tokens: TTFT per turn. The floor
    is raw mlx-lm prefilling only the new tokens onto a KV cache already holding the rest,
    plus the first token (floor.py, the one floor of every bench): what a perfect prefix cache
    would cost.
(b) The same chat with every server restarted before the last turn: mlxd keeps its disk
    cache, mlx_lm.server starts cold, vllm-mlx reloads what it saved at shutdown.
(c) Two models alternating under a memory budget that holds one worker: every turn swaps the
    other model out, so each turn pays a worker start plus a prefix promoted from disk. Model
    A replays (a)'s chat, so (a)'s floor applies to it; model B chats about other code.
(d) mlxd start-up with 1,000 prefix-cache entries on disk vs none.
(e) `--gemma` (a separate run): Gemma 3 270M, whose sliding-window layers keep rotating KV
    caches that cannot be trimmed once past the 512-token window. A multi-turn completion
    (base model, no chat template: each turn appends a ~450-token slice of code, a question
    and the greedy 16-token answer) growing past 4K tokens: mlxd's TTFT per turn against the
    floor (raw mlx-lm prefilling only the new tokens onto a copy of a cache holding the rest).

All servers run at once, OpenBLAS preloaded, on the same f32 model directory, and take
each turn round-robin (one computing at a time, after mlxd's background disk writes have
drained), so load from other processes on this shared box falls on all of them alike.
Run: .venv/bin/python ops/bench/prefix.py   (about 22-30 minutes; --gemma: (e) alone, about 10)
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))   # this checkout's daemon package, not an installed one
import common  # noqa: E402
from common import (InProc, load_now, median, mlx_lm_server, mlxd, model_dir, prepare_cache_dir,  # noqa: E402
                    publish, run_self, save_ttft_plot, stream_chat, ttft_axes, vllm_mlx_server,
                    wait_quiet)
from floor import common_len, serve as serve_floor  # noqa: E402

TURNS = 10
CHUNK_TOKENS = 450
REPLY_TOKENS = 32
REQUEST_TIMEOUT = 400
FLOOR_REPS = 3
STARTUP_ENTRIES = 1000
STARTUP_REPS = 3
QUESTIONS = ("What does this code do?", "Is there a bug in it?", "How would you test this part?",
             "Can this be simplified?", "Which edge cases does it miss?")
MLXD_CFG = {"dtype": "float32", "engine": {"max_batch_size": 8, "prefill_batch_size": 4, "prefill_step_size": 512},
            "prefix_cache": {"enabled": True, "memory_budget": "1GiB", "disk_budget": "8GiB", "kv_bits": None}}
SERVERS = ("mlxd", "mlx_lm.server", "vllm-mlx")
# (c): two models from the same weights (the only model this box has; they share a cache
# namespace, as identical weights should, but chat about different code so neither hits the
# other's entries). One f32 worker holds ~0.55 GB + its memory tier: a 1 GB budget fits one.
SWAP_MODELS = ("chat-a", "chat-b")
SWAP_SERVER = {"memory_budget": "1GB"}
SWAP_CFG = {**MLXD_CFG, "prefix_cache": {**MLXD_CFG["prefix_cache"], "memory_budget": "256MiB"}}
RESTART = "mlxd-restart"    # a second mlxd on its own cache dir: plays turns 1..N-1, restarts, plays turn N


def user_turns(tokenizer, skip: int = 0) -> list[str]:
    """TURNS user messages, each a ~CHUNK_TOKENS slice of argparse.py (after `skip` slices) plus a
    question (deterministic)."""
    import argparse as src

    chunks, cur = [], ""
    for line in inspect.getsource(src).splitlines(keepends=True):
        cur += line
        if len(tokenizer.encode(cur)) >= CHUNK_TOKENS:
            chunks.append(cur)
            cur = ""
        if len(chunks) == skip + TURNS:
            break
    return [f"Here is part {i + 1} of the module I am working on:\n```python\n{c}```\n{QUESTIONS[i % len(QUESTIONS)]}"
            for i, c in enumerate(chunks[skip:])]


def turn(server, messages: list, user: str, model: str | None = None) -> dict:
    """One turn: send the chat plus `user`, append both sides to `messages`, return the timings."""
    messages.append({"role": "user", "content": user})
    r = stream_chat(server, messages, REPLY_TOKENS, timeout=REQUEST_TIMEOUT, model=model)
    messages.append({"role": "assistant", "content": r["text"]})
    print(f"  {model or server.name} turn {len(messages) // 2}: ttft {r['ttft']:.2f}s prompt {r['prompt_tokens']} "
          f"cached {r['cached_tokens']}", flush=True)
    return {k: r[k] for k in ("ttft", "prompt_tokens", "cached_tokens", "completion_tokens", "total")}


def warm_up(server) -> None:
    stream_chat(server, [{"role": "user", "content": "Hi"}], 4, timeout=300)


def cache_stats(server, model: str = "smollm2") -> dict:
    try:
        return httpx.get(f"{server.url}/v1/cache/stats", timeout=30).json()["models"][model]
    except Exception as e:  # a report should not die on a stats call (or on a model not loaded)
        return {"error": str(e)}


def model_status(server, model: str) -> dict:
    return next(m for m in httpx.get(f"{server.url}/v1/status", timeout=30).json()["models"] if m["name"] == model)


def settle(servers, timeout: float = 120, model: str = "smollm2") -> None:
    """Wait until no mlxd has disk writes pending, so its writer thread does not load someone else's turn."""
    deadline = time.monotonic() + timeout
    for s in servers:
        while s.name.startswith("mlxd") and s.proc and s.proc.poll() is None and time.monotonic() < deadline:
            if not cache_stats(s, model).get("disk", {}).get("pending_writes"):
                break
            time.sleep(0.2)


def log_digest(path: Path) -> str:
    """A log's tail plus its cache-related lines (vllm-mlx says there whether it reloaded its cache)."""
    lines = path.read_text(errors="replace").splitlines()
    keys = ("lifespan", "cache_fetch", "HIT", "prefix cache", "Prompt cache", "Traceback", "Error")
    picked = [line for line in lines if any(k in line for k in keys)][-60:]
    return "\n".join(picked + ["--- tail ---"] + lines[-30:])


def disk_hit_tokens(server) -> dict:
    """Prompt tokens each model has served from its disk tier so far (mlxd's own counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {s.labels["model"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "mlxd_prefix_cache_hits_total" and s.labels.get("tier") == "disk"}


def swap_run(tmp: Path, chats: dict, res: dict) -> dict:
    """(c): the two models take turns under a budget that holds one, so every request finds the
    other model resident: stop it, start this one's worker, promote the chat's prefix from disk."""
    c = {"turns": {m: [] for m in SWAP_MODELS}, "error": None}
    msgs = {m: [] for m in SWAP_MODELS}
    models = [{"name": m, **SWAP_CFG, "preload": m == SWAP_MODELS[0]} for m in SWAP_MODELS]
    with mlxd(tmp, {}, name="mlxd-swap", cache_dir=tmp / "swap", models=models, server=SWAP_SERVER) as s:
        try:
            c["startup"] = s.start(timeout=300)
            warm_up(s)
            for i in range(TURNS):
                for m in SWAP_MODELS:
                    res["gates"].append(wait_quiet())
                    for x in SWAP_MODELS:
                        settle([s], model=x)
                    started, disk = model_status(s, m)["workers_started"], disk_hit_tokens(s).get(m, 0)
                    r = turn(s, msgs[m], chats[m][i], model=m)
                    status = {x["name"]: x for x in httpx.get(f"{s.url}/v1/status", timeout=30).json()["models"]}
                    r["loaded"] = status[m]["workers_started"] > started
                    r["start_seconds"] = status[m]["start_seconds"] if r["loaded"] else None
                    r["from_disk"] = disk_hit_tokens(s).get(m, 0) - disk
                    r["others_ready"] = [n for n, x in status.items() if x["state"] == "ready" and n != m]
                    c["turns"][m].append(r)
            c["cache_stats"] = {m: cache_stats(s, m) for m in SWAP_MODELS}
        except Exception as e:
            c["error"] = f"{type(e).__name__}: {e}"[:3000]
            print(f"  (c) FAILED: {c['error'][:300]}", flush=True)
    c["messages"] = msgs
    return c


# -- in-process measurements (re-executed with OpenBLAS preloaded) ---------------------------

def floor_worker(payload: dict) -> None:
    """Per request (a chat ending in a user turn): the floor (floor.py) of its new tokens onto
    the reusable prefix (previous prompt + reply, as far as it matches)."""
    def tokens_of(f, req):
        msgs, tok = req["messages"], f.tokenizer
        tokens = list(tok.apply_chat_template(msgs, add_generation_prompt=True))
        prev = []
        if len(msgs) > 1:
            prev = list(tok.apply_chat_template(msgs[:-2], add_generation_prompt=True)) + \
                list(tok.encode(msgs[-2]["content"], add_special_tokens=False))
        return tokens, common_len(prev, tokens)

    serve_floor(payload, tokens_of)


def make_entries(payload: dict) -> dict:
    """Write `n` small real-shaped entries through mlxd's own PrefixCache, in the worker's namespace."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.models.sources import resolve_model
    from daemon.worker.cache.prefix import PrefixCache

    cache_dir = Path(payload["cache_dir"])
    resolved = resolve_model("embedded:smollm2", dtype="float32", cache_dir=cache_dir)
    model, _ = load(str(resolved.path))
    pc = PrefixCache(model, fingerprint=resolved.fingerprint, root=cache_dir / "prefix",
                     memory_budget=64 << 20, disk_budget=8 << 30, kv_bits=None)
    t0, n_tok = time.perf_counter(), payload["tokens"]
    args = model.args
    kv = mx.zeros((1, args.num_key_value_heads, n_tok, args.hidden_size // args.num_attention_heads))
    for i in range(payload["n"]):
        cache = make_prompt_cache(model)
        for c in cache:                       # exactly n_tok long, no 256-step growth buffer
            c.keys, c.values, c.offset = kv, kv, n_tok
        pc.store([100 + i] + [(i * 7 + j) % 40_000 + 100 for j in range(n_tok - 1)], cache)
        if i % 50 == 49:
            pc.disk.flush()                   # bound the writer's queue
    pc.close()
    return {"entries": pc.disk.stats()["entries"], "namespace": pc.disk.dir.name, "seconds": time.perf_counter() - t0}


# -- report ---------------------------------------------------------------------------------

def fmt(x, d=2):
    return "n/a" if x is None else f"{x:.{d}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def report(res: dict, cmd: str) -> str:
    a, fl = res["a"], res["floor"]
    gates = [g["others_busy"] for g in res["gates"]]
    L = ["# Prefix-cache benchmark", "", f"Command: `{cmd}`", "",
         f"Model: SmolLM2-135M-Instruct f32, OpenBLAS preloaded everywhere, greedy, {REPLY_TOKENS}-token replies. "
         f"Took {res['seconds'] / 60:.1f} min.", "",
         f"Shared machine: load average {res['load_start']} at start, {res['load_end']} at end; before {len(gates)} "
         f"rounds other processes kept the CPUs {min(gates):.0%}-{max(gates):.0%} busy (median {median(gates):.0%}; "
         f"each round waited up to {res['quiet_wait']:.0f} s for them to go idle). Turns go round-robin over the "
         "servers, so that load is shared out evenly.", "",
         "## (a) TTFT per turn (s); cached = prompt tokens the server reported as reused", "",
         "| turn | prompt tok | floor new tok | floor | mlxd | mlxd cached | mlxd 2nd run | mlx_lm.server | "
         "mlx_lm cached | vllm-mlx | mlxd / floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in range(TURNS):
        d, d2, m, v, f = (a["mlxd"][i], a[RESTART][i] if i < TURNS - 1 else None, a["mlx_lm.server"][i],
                          a["vllm-mlx"][i], fl[i])
        L.append(f"| {i + 1} | {d['prompt_tokens']} | {f['new']} | {fmt(f['ttft'], 3)} | {fmt(d['ttft'])} | "
                 f"{d['cached_tokens']} | {fmt(d2['ttft']) if d2 else '-'} | {fmt(m['ttft'])} | {m['cached_tokens']} | "
                 f"{fmt(v['ttft'])} | {fmt(ratio(d['ttft'], f['ttft']))}x |")
    warm = [ratio(a["mlxd"][i]["ttft"], fl[i]["ttft"]) for i in range(1, TURNS)]
    excess = [a["mlxd"][i]["ttft"] - fl[i]["ttft"] for i in range(1, TURNS) if a["mlxd"][i]["ttft"] is not None]
    L += ["", f"mlxd / floor on turns 2-{TURNS} (cache hits): median {fmt(median(warm))}x, max {fmt(max(w for w in warm if w is not None))}x; median excess "
              f"{fmt(median(excess) and median(excess) * 1000, 0)} ms per turn. vllm-mlx reports no cached_tokens.", "",
          *peer_lines(a), "",
          *disk_line(res), "",
          f"## (b) Last turn (turn {TURNS}, {a['mlxd'][-1]['prompt_tokens']} prompt tokens) after a restart", "",
          "| server | TTFT without restart (s) | TTFT after restart (s) | cached after restart | start-up (s) |",
          "|---|---|---|---|---|"]
    for name in SERVERS:
        b = res["b"][name]
        L.append(f"| {name} | {fmt(a[name][-1]['ttft'])} | {fmt(b['ttft'])} | {b['cached_tokens']} | "
                 f"{fmt(b['startup'], 1)} |")
    L += [f"| floor | {fmt(fl[-1]['ttft'], 3)} | | | |", "",
          f"mlxd 'without restart' is its turn {TURNS} above. 'After restart' is a second mlxd on its own cache dir "
          f"that played turns 1-{TURNS - 1} alongside (column 'mlxd 2nd run'), was stopped (its worker flushes the "
          f"disk tier) and started again on the same dir. Peers are restarted after turn {TURNS} and sent turn "
          f"{TURNS} again. Every server gets a 4-token warm-up request after start, before the timed turn. vllm-mlx "
          "saves its prefix cache at shutdown and reloads it at start (its log: 'Loaded 10 prefix cache entries', "
          "then a HIT with cached=prompt, remaining=0), yet its TTFT stays that of a cold prefill.", "",
          *([f"Failures: {json.dumps(res['errors'])}", ""] if res["errors"] else []),
          *swap_report(res), "",
          f"## (d) mlxd start-up until /v1/status says the model is ready (median of {len(res['d']['empty'])})", "",
          "| prefix-cache entries on disk | start-up (s) | runs |", "|---|---|---|",
          f"| 0 | {fmt(median(res['d']['empty']))} | {', '.join(fmt(x) for x in res['d']['empty'])} |",
          f"| {res['d']['made']['entries']} | {fmt(median(res['d']['full']))} | "
          f"{', '.join(fmt(x) for x in res['d']['full'])} |", "",
          f"Entries: {res['d']['tokens']}-token KV caches written through `PrefixCache.store` into namespace "
          f"`{res['d']['made']['namespace']}` in {res['d']['made']['seconds']:.0f} s; the daemon reported "
          f"{res['d']['loaded_entries']} disk entries after start.", ""]
    return "\n".join(L)


def peer_lines(a: dict) -> list[str]:
    """mlxd against the peers over the cache-hit turns, with this box's noise band beside it:
    two identical mlxd instances playing the same turns."""
    hit = range(1, TURNS)
    total = {n: sum(a[n][i]["ttft"] or float("nan") for i in hit) for n in SERVERS}
    fastest = sum(all((a["mlxd"][i]["ttft"] or 1e9) <= (a[n][i]["ttft"] or 1e9) for n in SERVERS[1:]) for i in hit)
    twins = [abs(a["mlxd"][i]["ttft"] - a[RESTART][i]["ttft"]) / min(a["mlxd"][i]["ttft"], a[RESTART][i]["ttft"])
             for i in range(1, TURNS - 1) if a["mlxd"][i]["ttft"] and a[RESTART][i]["ttft"]]
    L = [f"Sum of TTFT over turns 2-{TURNS}: " + ", ".join(f"{n} {total[n]:.1f} s" for n in SERVERS)
         + f". mlxd was the fastest of the three on {fastest} of {len(hit)} turns"]
    if twins:
        L[0] += (f"; two identical mlxd instances (columns 'mlxd' and 'mlxd 2nd run') differ by up to "
                 f"{max(twins):.0%} (median {median(twins):.0%}) on the same turn, which is the noise of this box.")
    return L


def disk_line(res: dict) -> list[str]:
    d = (res.get("mlxd_cache_stats") or {}).get("disk") or {}
    if "entries" not in d:
        return []
    return [f"mlxd's disk tier after these turns (and the warm-up request): {d['entries']} entries, "
            f"{d['bytes'] / 1e6:.0f} MB; {d.get('superseded', 0)} earlier snapshots of the chat superseded."]


def swap_report(res: dict) -> list[str]:
    c, a_name, b_name = res["c"], *SWAP_MODELS
    A, B = c["turns"][a_name], c["turns"][b_name]
    L = ["## (c) Two models alternating under a memory budget that holds one", "",
         f"One mlxd, models `{a_name}` and `{b_name}` (same f32 weights), `server.memory_budget: "
         f"{SWAP_SERVER['memory_budget']}`, prefix memory tier {SWAP_CFG['prefix_cache']['memory_budget']} each. "
         f"They take turns, so every request first stops the other model's worker and starts its own; "
         f"`{a_name}` replays (a)'s chat, so (a)'s floor is its floor. Target on `{a_name}`'s swap-back turns "
         f"(2-{TURNS}): TTFT <= its worker start + 1.2 x floor. 'start' = spawn until ready, as mlxd measures it "
         "(`start_seconds` in /v1/status); 'from disk' = prompt tokens served from the disk tier "
         "(`mlxd_prefix_cache_hits_total{tier=\"disk\"}` before/after).", "",
         f"| turn | prompt tok | {a_name} TTFT | cached | from disk | start (s) | floor | start + 1.2 x floor | "
         f"TTFT / target | {b_name} TTFT | {b_name} cached | {b_name} start (s) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for i, (x, y) in enumerate(zip(A, B)):
        f = res["floor"][i]["ttft"] if i < len(res["floor"]) else None
        target = (x["start_seconds"] or 0) + 1.2 * f if f is not None and x["loaded"] else None
        r = ratio(x["ttft"], target)
        if i > 0 and r is not None:
            ratios.append(r)
        L.append(f"| {i + 1} | {x['prompt_tokens']} | {fmt(x['ttft'])} | {x['cached_tokens']} | "
                 f"{int(x['from_disk'])} | {fmt(x['start_seconds'])} | {fmt(f, 3)} | {fmt(target)} | "
                 f"{fmt(r)} | {fmt(y['ttft'])} | {y['cached_tokens']} | {fmt(y['start_seconds'])} |")
    same = all(x["prompt_tokens"] == d["prompt_tokens"] for x, d in zip(A, res["a"]["mlxd"]))
    swaps = sum(t["loaded"] for t in A + B)
    alone = sum(not t["others_ready"] for t in A + B)
    L += ["", f"{swaps} of {len(A) + len(B)} requests started their model's worker; after {alone} of them the "
              "other model was no longer resident. "
              + (f"Swap-back turns: TTFT / target max {max(ratios):.2f}, median {median(ratios):.2f} "
                 f"({sum(r <= 1 for r in ratios)} of {len(ratios)} within). " if ratios else "")
              + ("" if same else f"`{a_name}`'s prompt sizes differ from (a)'s, so the floor is approximate. ")]
    if c.get("error"):
        L += ["", f"Failure: {c['error']}"]
    return L


def plot(res: dict, path: Path) -> None:
    fig, ax = ttft_axes("Multi-turn coding chat, SmolLM2-135M f32, CPU + OpenBLAS")
    if fig is None:
        return
    turns = list(range(1, TURNS + 1))
    nan = float("nan")
    for name, style in zip(SERVERS, ("o-", "s-", "^-")):
        line, = ax.plot(turns, [t["ttft"] or nan for t in res["a"][name]], style, label=name)
        ax.plot([TURNS], [res["b"][name]["ttft"] or nan], style[0], mfc="none", ms=12, color=line.get_color(),
                label=f"{name} after restart")
    swapped = res["c"]["turns"][SWAP_MODELS[0]]
    ax.plot(turns[:len(swapped)], [t["ttft"] or nan for t in swapped], "o:", color="tab:purple",
            label="mlxd, model swapped out and back every turn (c)")
    ax.plot(turns[1:len(swapped)], [(t["start_seconds"] or nan) + 1.2 * f["ttft"]
                                    for t, f in zip(swapped[1:], res["floor"][1:])], "--", color="tab:purple",
            alpha=0.5, label="(c) target: its worker start + 1.2 x floor")
    ax.plot(turns, [t["ttft"] for t in res["floor"]], "k--", label="floor (raw mlx-lm, new tokens only)")
    save_ttft_plot(fig, ax, turns, "turn (context grows ~500 tokens per turn)", path)


# -- (e) Gemma 3: rotating sliding-window caches --------------------------------------------

GEMMA_REPLY_TOKENS = 16
GEMMA_CFG = {"source": "embedded:gemma3-270m", **MLXD_CFG}


def gemma_turns(tokenizer) -> list[str]:
    """TURNS completion-style turns: a code slice and a question, to be followed by the answer."""
    return [t.replace("Here is part", "\nHere is part").replace("```\n", "```\nQuestion: ") + "\nAnswer:"
            for t in user_turns(tokenizer)]


def stream_completion(server, prompt: str, max_tokens: int, timeout: float = REQUEST_TIMEOUT) -> dict:
    """One greedy streamed /v1/completions request, timed at its first text chunk."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    first, parts, usage = None, [], {}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(timeout, connect=10)) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            obj = json.loads(line[5:])
            usage = obj.get("usage") or usage
            for ch in obj.get("choices") or []:
                if ch.get("text"):
                    first = first or time.perf_counter()
                    parts.append(ch["text"])
    return {"ttft": first - t0 if first else None, "text": "".join(parts), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "completion_tokens": usage.get("completion_tokens"), "total": time.perf_counter() - t0}


def gemma_floor_worker(payload: dict) -> None:
    """Per turn: the floor (floor.py) of its new tokens onto the reusable prefix (the previous
    prompt + reply, as far as it matches); a rotating cache is measured on copies there."""
    def tokens_of(f, req):
        tokens = f.tokenizer.encode(req["prompt"])
        prev = f.tokenizer.encode(req["previous"]) if req["previous"] else []
        return tokens, common_len(prev, tokens)

    serve_floor(payload, tokens_of)


def gemma_report(res: dict, cmd: str) -> str:
    rows = res["turns"]
    cmd = cmd.replace("prefix-gemma.py", "prefix.py --gemma")
    L = ["# Prefix-cache benchmark (e): Gemma 3 270M, rotating sliding-window caches", "", f"Command: `{cmd}`", "",
         f"Model: Gemma 3 270M base (Q4_K_M GGUF imported as f32), OpenBLAS preloaded, greedy, "
         f"{GEMMA_REPLY_TOKENS}-token answers, /v1/completions. Sliding layers: 15 of 18, window 512 "
         f"(`RotatingKVCache`, not trimmable once wrapped). Took {res['seconds'] / 60:.1f} min. Load average "
         f"{res['load_start']} at start, {res['load_end']} at end (shared 2-core box).", "",
         "| turn | prompt tok | mlxd cached | floor new tok | floor TTFT (s) | mlxd TTFT (s) | mlxd / floor |",
         "|---|---|---|---|---|---|---|"]
    for i, (m, f) in enumerate(zip(rows, res["floor"])):
        L.append(f"| {i + 1} | {m['prompt_tokens']} | {m['cached_tokens']} | {f['new']} | {fmt(f['ttft'], 3)} | "
                 f"{fmt(m['ttft'])} | {fmt(ratio(m['ttft'], f['ttft']))}x |")
    warm = [ratio(m["ttft"], f["ttft"]) for m, f in zip(rows[1:], res["floor"][1:])]
    L += ["", f"Turns 2-{len(rows)} (cache hits past the window): mlxd / floor median {fmt(median(warm))}x, "
              f"max {fmt(max((w for w in warm if w is not None), default=None))}x. "
              f"Cold turn 1 is a full prefill for both.", ""]
    if res.get("error"):
        L += [f"Failure: {res['error']}", ""]
    return "\n".join(L)


def gemma_main(quick: bool) -> int:
    from transformers import AutoTokenizer

    from daemon.models.sources import resolve_model

    t_start = time.perf_counter()
    mdir = resolve_model("embedded:gemma3-270m", dtype="float32", cache_dir=common.MODELS_CACHE).path
    turns = gemma_turns(AutoTokenizer.from_pretrained(str(mdir)))
    res = {"model_dir": str(mdir), "load_start": load_now(), "turns": [], "floor": [], "gates": [], "error": None}
    with tempfile.TemporaryDirectory(prefix="mlxd-prefix-gemma-") as tmp:
        tmp = Path(tmp)
        floor = None
        with mlxd(tmp, {}, name="mlxd-gemma", models=[{"name": "gemma", **GEMMA_CFG}]) as s:
            try:
                res["startup"] = s.start(timeout=600)
                stream_completion(s, "Hello", 2)                            # warm-up
                floor = InProc("--gemma-floor", {"model_dir": str(mdir)}, tmp, timeout=600)
                prompt = ""
                for i, t in enumerate(turns):
                    res["gates"].append(wait_quiet())
                    settle([s], model="gemma")
                    previous, prompt = prompt, prompt + t
                    r = stream_completion(s, prompt, GEMMA_REPLY_TOKENS)
                    f = floor.call({"prompt": prompt, "previous": previous, "reps": FLOOR_REPS})
                    res["turns"].append({k: r[k] for k in ("ttft", "prompt_tokens", "cached_tokens", "completion_tokens", "text")})
                    res["floor"].append(f)
                    print(f"  turn {i + 1}: prompt {r['prompt_tokens']} cached {r['cached_tokens']} "
                          f"ttft {r['ttft']:.2f}s floor {f['ttft']:.3f}s (new {f['new']})", flush=True)
                    prompt += r["text"]
                res["cache_stats"] = cache_stats(s, "gemma")
            except Exception as e:
                res["error"] = f"{type(e).__name__}: {e}"[:3000]
                print(f"  (e) FAILED: {res['error'][:300]}", flush=True)
            finally:
                if floor is not None:
                    floor.close()
        res["logs"] = {p.name: log_digest(p) for p in tmp.glob("*.log")}
    publish("prefix-gemma", res, gemma_report, t_start, quick)
    return 0 if res["error"] is None else 1


# -- the run --------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--floor", help=argparse.SUPPRESS)          # internal: in-process measurements
    ap.add_argument("--make-entries", help=argparse.SUPPRESS)
    ap.add_argument("--gemma-floor", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke-test the harness (tiny sizes, numbers meaningless)")
    ap.add_argument("--gemma", action="store_true", help="run only (e): Gemma 3 270M and its sliding-window caches")
    args = ap.parse_args()
    if args.floor:
        floor_worker(json.loads(args.floor))
        return 0
    if args.gemma_floor:
        gemma_floor_worker(json.loads(args.gemma_floor))
        return 0
    if args.make_entries:
        print(json.dumps(make_entries(json.loads(args.make_entries))))
        return 0
    global TURNS, REPLY_TOKENS, STARTUP_ENTRIES, STARTUP_REPS
    common.QUIET_WAIT = 30.0
    if args.quick:
        TURNS, REPLY_TOKENS, STARTUP_ENTRIES, STARTUP_REPS, common.QUIET_WAIT = 3, 8, 30, 1, 3.0
    if args.gemma:
        return gemma_main(args.quick)

    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    mdir = model_dir().path
    tokenizer = AutoTokenizer.from_pretrained(str(mdir))
    turns = user_turns(tokenizer)
    res = {"model_dir": str(mdir), "load_start": load_now(), "quiet_wait": common.QUIET_WAIT, "gates": [],
           "startup": {}, "errors": {},
           "a": {}, "b": {}, "messages": {}, "floor": []}
    with tempfile.TemporaryDirectory(prefix="mlxd-prefix-bench-") as tmp:
        tmp = Path(tmp)
        servers = {"mlxd": mlxd(tmp, MLXD_CFG, cache_dir=tmp / "run1"),
                   RESTART: mlxd(tmp, MLXD_CFG, name=RESTART, cache_dir=tmp / "run2"),
                   "mlx_lm.server": mlx_lm_server(tmp, mdir, preload=True),
                   "vllm-mlx": vllm_mlx_server(tmp, mdir, preload=True)}
        floor = None
        try:
            for name, s in servers.items():
                res["startup"][name] = s.start(timeout=300)
                warm_up(s)
                res["a"][name], res["messages"][name] = [], []
            floor = InProc("--floor", {"model_dir": str(mdir)}, tmp)

            def play(name, i, server=None):
                """Turn i on one server; a failure is recorded and that server sits out the rest."""
                if name in res["errors"]:
                    return
                try:
                    res["a"][name].append(turn(server or servers[name], res["messages"][name], turns[i]))
                except Exception as e:
                    res["errors"][name] = f"turn {i + 1}: {type(e).__name__}: {e}"[:3000]
                    print(f"  {name} FAILED: {res['errors'][name][:300]}", flush=True)

            for i in range(TURNS):                                  # (a), round-robin, rotating who goes first
                res["gates"].append(wait_quiet())
                order = [*servers, "floor"]
                order = order[i % len(order):] + order[:i % len(order)]
                order.remove("floor")
                order.insert(order.index("mlxd") + 1, "floor")      # the floor needs mlxd's turn (its chat)
                for name in order:
                    settle(servers.values())
                    if name == "floor":
                        f = floor.call({"messages": res["messages"]["mlxd"][:2 * i + 1], "reps": FLOOR_REPS})
                        res["floor"].append(f)
                        print(f"  floor turn {i + 1}: ttft {f['ttft']:.3f}s new {f['new']}", flush=True)
                    elif not (name == RESTART and i == TURNS - 1):
                        play(name, i)
            res["mlxd_cache_stats"] = cache_stats(servers["mlxd"])

            for name in (*SERVERS[1:], RESTART):                    # (b): restart, then the last turn
                s = servers[name]
                s.stop()
                if name != RESTART:
                    res["messages"][name] = res["messages"][name][:-2]
                res["gates"].append(wait_quiet())
                startup = s.start(timeout=300)
                warm_up(s)
                before = len(res["a"][name])
                play(name, TURNS - 1)
                if len(res["a"][name]) > before:
                    key = "mlxd" if name == RESTART else name
                    res["b"][key] = {**res["a"][name].pop(), "startup": startup}
                    if name == RESTART:
                        res["b"][key]["cache_stats"] = cache_stats(s)
                s.stop()
        finally:
            if floor is not None:
                floor.close()
            for s in servers.values():
                s.stop()
        for name in servers:
            res["a"][name] += [{"ttft": None, "prompt_tokens": None, "cached_tokens": None}] * \
                ((TURNS - (name == RESTART)) - len(res["a"][name]))
        for name in SERVERS:
            res["b"].setdefault(name, {"ttft": None, "cached_tokens": None, "startup": None})

        print("(c) two models alternating under a memory budget", flush=True)
        res["c"] = swap_run(tmp, {SWAP_MODELS[0]: turns, SWAP_MODELS[1]: user_turns(tokenizer, skip=TURNS)}, res)

        print(f"mlxd start-up with {STARTUP_ENTRIES} entries vs none", flush=True)
        d = res["d"] = {"tokens": 40, "empty": [], "full": []}
        d["made"] = run_self("--make-entries", {"cache_dir": str(prepare_cache_dir(tmp / "full")),
                                                "n": STARTUP_ENTRIES, "tokens": d["tokens"]}, preload=True, timeout=900)
        for rep in range(STARTUP_REPS):
            res["gates"].append(wait_quiet())
            for kind in ("empty", "full"):
                with mlxd(tmp, MLXD_CFG, name=f"mlxd-{kind}", cache_dir=tmp / kind) as s:
                    d[kind].append(s.start(timeout=300))
                    if kind == "full" and rep == 0:
                        d["loaded_entries"] = cache_stats(s).get("disk", {}).get("entries")
        res["logs"] = {p.name: log_digest(p) for p in tmp.glob("*.log")}

    plot(res, publish("prefix", res, report, t_start, args.quick) / "prefix_ttft.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
