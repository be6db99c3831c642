"""A chat turn through Ollama's /api/chat vs the same turn through /v1/chat/completions: TTFT.

Issue 24's target: /api/chat within 1.1x of /v1/chat/completions (TTFT, same cached tokens).
One mlxd on the embedded SmolLM2 (config.example.yaml's settings, f32 + OpenBLAS), one
conversation of ~PREFIX_TOKENS tokens cached by a warm-up turn. Each round asks two new
questions of the same length after it, one per API, in alternating order, so both reuse the
same cached prefix and prefill the same number of new tokens; the cached tokens of each turn
are read from the turn itself (OpenAI's usage.prompt_tokens_details) and from the daemon's
prefix_cache_hits counter (Ollama's answer has no such field). TTFT: request sent to the first
line or chunk that carries text, streamed, over one keep-alive client per API.
Run: .venv/bin/python ops/bench/ollama_ttft.py [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import json
import json.decoder
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_now, median, mlxd, publish, wait_quiet  # noqa: E402

PREFIX_TOKENS = 1500
MAX_TOKENS = 8
ROUNDS = 15
CFG = {"dtype": "float32", "sampling": {"temperature": 0.0, "max_tokens": 64},
       "prefix_cache": {"enabled": True, "memory_budget": "1GiB", "disk_budget": "2GiB"}}


def history(tokenizer) -> list[dict]:
    code = tokenizer.decode(tokenizer.encode(inspect.getsource(json.decoder))[:PREFIX_TOKENS])
    return [{"role": "system", "content": "You are a careful code reviewer."},
            {"role": "user", "content": "Here is a module.\n\n" + code},
            {"role": "assistant", "content": "I have read it. Ask me about it."}]


def question(n: int) -> dict:
    return {"role": "user", "content": f"Question {n:04d}: which function here decodes a JSON string?"}


def hits(client: httpx.Client) -> float:
    """Prompt tokens served from the cache so far, every tier (memory, disk) summed."""
    text = client.get("/metrics").text
    found = re.findall(r'^mlxd_prefix_cache_hits_total\{(?=[^}]*model="smollm2")[^}]*\} (\S+)$', text, re.M)
    if not found:
        raise RuntimeError("no mlxd_prefix_cache_hits_total series for smollm2 in /metrics")
    return sum(float(v) for v in found)


def openai_turn(client: httpx.Client, messages: list[dict]) -> dict:
    body = {"model": "smollm2", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), None, {}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            obj = json.loads(line[5:])
            usage = obj.get("usage") or usage
            if first is None and any((c.get("delta") or {}).get("content") for c in obj.get("choices") or []):
                first = time.perf_counter()
    return {"ttft": first - t0, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def ollama_turn(client: httpx.Client, messages: list[dict]) -> dict:
    body = {"model": "smollm2", "messages": messages, "options": {"num_predict": MAX_TOKENS, "temperature": 0.0}}
    before = hits(client)
    t0, first, last = time.perf_counter(), None, {}
    with client.stream("POST", "/api/chat", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            obj = json.loads(line)
            if first is None and (obj.get("message") or {}).get("content"):
                first = time.perf_counter()
            last = obj
    return {"ttft": first - t0, "prompt_tokens": last["prompt_eval_count"], "cached_tokens": int(hits(client) - before)}


def run(quick: bool) -> dict:
    from mlx_lm.utils import load_tokenizer

    from common import model_dir
    tokenizer = load_tokenizer(model_dir().path)
    rounds = 3 if quick else ROUNDS
    res = {"load_start": load_now(), "prefix_tokens": PREFIX_TOKENS, "max_tokens": MAX_TOKENS, "rounds": rounds,
           "openai": [], "ollama": []}
    convo = history(tokenizer)
    with tempfile.TemporaryDirectory() as tmp, mlxd(Path(tmp), CFG) as server:
        server.start()
        res["worker"] = {k: server.model_status("smollm2")["worker"].get(k) for k in ("device", "blas", "dtype")}
        with httpx.Client(base_url=server.url, timeout=600) as oa, httpx.Client(base_url=server.url, timeout=600) as ol:
            openai_turn(oa, convo + [question(9999)])           # caches the conversation
            ollama_turn(ol, convo + [question(9998)])           # and warms the Ollama path
            for i in range(rounds):
                res.setdefault("quiet", []).append(wait_quiet())
                turns = [("openai", openai_turn, oa), ("ollama", ollama_turn, ol)]
                for name, turn, client in (turns if i % 2 == 0 else turns[::-1]):
                    res[name].append(turn(client, convo + [question(2 * i + (name == "ollama"))]))
    for name in ("openai", "ollama"):
        res[f"{name}_ttft_median"] = median(r["ttft"] for r in res[name])
    res["ratio"] = res["ollama_ttft_median"] / res["openai_ttft_median"]
    return res


def report(res: dict, command: str) -> str:
    w = res["worker"]
    rows = []
    for name, label in (("openai", "/v1/chat/completions"), ("ollama", "/api/chat")):
        runs = res[name]
        rows.append(f"| {label} | {1000 * res[f'{name}_ttft_median']:.1f} | "
                    f"{1000 * min(r['ttft'] for r in runs):.1f} | {1000 * max(r['ttft'] for r in runs):.1f} | "
                    f"{median(r['prompt_tokens'] for r in runs):.0f} | {median(r['cached_tokens'] for r in runs):.0f} |")
    return "\n".join([
        "# /api/chat vs /v1/chat/completions: time to first token",
        "",
        f"One mlxd ({w['device']}, BLAS {w['blas']}, {w['dtype']}), SmolLM2-135M, a conversation of "
        f"~{res['prefix_tokens']} tokens cached, then {res['rounds']} rounds of one new question through each "
        f"API (alternating which goes first), {res['max_tokens']} tokens each, streamed. Load average at start / "
        f"end: {res['load_start']} / {res['load_end']}.",
        "",
        "| API | TTFT median (ms) | min | max | prompt tokens | cached tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"**/api/chat / /v1/chat/completions, median TTFT: {res['ratio']:.3f}x** (target: at most 1.1x).",
        "",
        f"Command: `{command}`",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, results to a temp dir (numbers mean nothing)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(args.quick)
    publish("ollama_ttft", res, report, t0, args.quick)


if __name__ == "__main__":
    main()
