"""A 2-rank loopback pipeline group against one process, on SmolLM2: decode speed, the CPU
each rank burns while idle (the doorbell keeps it off collectives) and while decoding.

mlxd with two models from the same weights, `grp` (distributed over 127.0.0.1 twice) and
`one`; for each, one greedy completion of `--tokens` tokens after a warm-up (TTFT, decode
tokens/s), then each process's CPU over `--idle` seconds with nothing to do (/proc/<pid>/stat).
On this 2-core box the two ranks share the cores, so the group is slower than one process:
the number to watch is idle CPU (near 0) and that the answers are identical.
Usage: python ops/bench/group.py [--tokens 64] [--idle 20]. Writes ops/bench/results/group.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_seconds, mlxd, wait_quiet  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea,"


def complete(url: str, model: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", timeout=900,
                   json={"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0})
    r.raise_for_status()
    body = r.json()
    return {"text": body["choices"][0]["text"], "tokens": body["usage"]["completion_tokens"],
            "seconds": time.perf_counter() - t0}


def cpu_percent(pids: list[int], seconds: float, during=None) -> list[float]:
    c0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
    if during is not None:
        during()
    else:
        time.sleep(seconds)
    dt = time.monotonic() - t0
    return [round(100 * (cpu_seconds(p) - c) / dt, 2) for p, c in zip(pids, c0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--idle", type=float, default=20)
    args = ap.parse_args()
    out = {"tokens": args.tokens}
    with tempfile.TemporaryDirectory() as tmp:
        server = mlxd(Path(tmp), {}, models=[
            {"name": "grp", "distributed": {"hosts": ["127.0.0.1", "127.0.0.1"]}, "prefix_cache": {"enabled": False}},
            {"name": "one", "prefix_cache": {"enabled": False}}])
        with server:
            server.start()
            status = httpx.get(f"{server.url}/v1/status", timeout=30).json()["models"]
            grp = next(m for m in status if m["name"] == "grp")
            one = next(m for m in status if m["name"] == "one")
            pids = {"grp rank 0": grp["pid"], "grp rank 1": grp["worker"]["ranks"][0]["pid"], "one": one["pid"]}
            out["gate"] = wait_quiet()
            for model in ("grp", "one"):
                complete(server.url, model, 4)                     # warm-up
                got = {}
                cpu = cpu_percent(list(pids.values()), 0,
                                  during=lambda: got.update(complete(server.url, model, args.tokens)))
                out[model] = {"tokens_per_s": round(got["tokens"] / got["seconds"], 2), "text": got["text"],
                              "cpu_percent_while_decoding": dict(zip(pids, cpu))}
            out["identical"] = out["grp"]["text"] == out["one"]["text"]
            time.sleep(3)
            out["idle_cpu_percent"] = dict(zip(pids, cpu_percent(list(pids.values()), args.idle)))
    print(json.dumps(out, indent=2))
    (RESULTS / "group.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
