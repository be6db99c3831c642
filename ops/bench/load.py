"""Concurrency load test: many streaming clients over two models, every request accounted for.

A daemon of its own serves two models (the embedded weights under two names, so two worker
processes); CLIENTS clients share REQUESTS chat requests of mixed prompt lengths and max_tokens.
Each request ends completed, rejected with 429 (the backpressure a full queue must give; the
queues hold exactly CLIENTS requests in all, so 429s come when one model gets more than its
share), or as a listed failure: anything else; a 429 is not retried. Reports
latency and time to first token, and the peak RSS of the daemon and of each worker, sampled
from /proc every 0.2 s. Writes ops/bench/results/load.{md,json}.

Run: .venv/bin/python ops/bench/load.py [--requests 256] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Mlxd, smol  # noqa: E402

RESULTS = ROOT / "ops" / "bench" / "results"
MODELS = ("load-a", "load-b")
PROMPT_WORDS = (5, 80, 400)           # ~25, ~120, ~530 prompt tokens with the template
MAX_TOKENS = (8, 32, 96)
WORDS = ("the model daemon serves tokens from a cache of prefixes while workers decode batches of "
         "requests under load and memory stays bounded by budgets set in the config file").split()


def plan(n: int, seed: int = 0) -> list[dict]:
    """The same mixed requests every run: model, prompt length and max_tokens per request."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.choice(PROMPT_WORDS)))
        out.append({"i": i, "model": MODELS[i % len(MODELS)], "max_tokens": rng.choice(MAX_TOKENS),
                    "prompt": f"Request {i}. Summarize: {words}"})
    return out


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB; (0, 0) once the process is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


class RssSampler(threading.Thread):
    """Peak RSS per process every 0.2 s; workers found (and re-found after restarts) via /v1/status."""

    def __init__(self, daemon: Mlxd):
        super().__init__(daemon=True)
        self.d, self.stop = daemon, threading.Event()
        self.procs = {daemon.proc.pid: "daemon"}
        self.peak: dict[int, int] = defaultdict(int)
        self.hwm: dict[int, int] = defaultdict(int)

    def run(self):
        last_status = 0.0
        while not self.stop.wait(0.2):
            if time.monotonic() - last_status > 1.0:
                last_status = time.monotonic()
                try:
                    for m in self.d.status()["models"]:
                        if m["pid"]:
                            self.procs[m["pid"]] = f"worker {m['name']}"
                except (httpx.HTTPError, ValueError):
                    pass
            for pid in list(self.procs):
                rss, hwm = rss_kib(pid)
                self.peak[pid] = max(self.peak[pid], rss)
                self.hwm[pid] = max(self.hwm[pid], hwm)

    def table(self) -> list[dict]:
        return [{"process": name, "pid": pid, "peak_rss_mib": round(self.peak[pid] / 1024, 1),
                 "vm_hwm_mib": round(self.hwm[pid] / 1024, 1)} for pid, name in self.procs.items()]


async def one(client: httpx.AsyncClient, req: dict) -> dict:
    """A streamed chat request; the outcome is completed, rejected (429) or failed."""
    body = {"model": req["model"], "max_tokens": req["max_tokens"], "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": req["prompt"]}]}
    rec = {"i": req["i"], "model": req["model"], "max_tokens": req["max_tokens"]}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec["outcome"] = "rejected" if r.status_code == 429 else "failed"
                rec["error"] = text[:300]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        rec["outcome"], rec["error"] = "failed", ev["error"]["message"]
                    elif ev.get("usage"):
                        rec["prompt_tokens"] = ev["usage"]["prompt_tokens"]
                        rec["completion_tokens"] = ev["usage"]["completion_tokens"]
                    elif "ttft_s" not in rec and ev["choices"] and ev["choices"][0]["delta"].get("content"):
                        rec["ttft_s"] = time.perf_counter() - t0
                rec.setdefault("outcome", "completed" if "completion_tokens" in rec else "failed")
    except Exception as e:  # a timeout, a dropped connection: listed, not raised
        rec.update(outcome="failed", error=f"{type(e).__name__}: {e}")
    rec["latency_s"] = time.perf_counter() - t0
    return rec


async def drive(url: str, reqs: list[dict], clients: int, timeout: float, deadline: float) -> list[dict]:
    """Every request's record; those not done by the deadline are failures too."""
    queue = list(reversed(reqs))
    out: dict[int, dict] = {}

    async def client_loop(client):
        while queue:
            rec = await one(client, queue.pop())
            out[rec["i"]] = rec

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return [out.get(r["i"]) or {"i": r["i"], "model": r["model"], "max_tokens": r["max_tokens"],
                                "outcome": "failed", "error": f"not done in the {deadline:.0f} s deadline",
                                "latency_s": deadline} for r in reqs]


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in ms."""
    if not values:
        return None
    v = sorted(values)
    return round(1000 * v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 1)


def summarize(records: list[dict], wall: float) -> dict:
    rows = {}
    for model in (*MODELS, "all"):
        rs = [r for r in records if model in ("all", r["model"])]
        done = [r for r in rs if r["outcome"] == "completed"]
        lat = [r["latency_s"] for r in done]
        ttft = [r["ttft_s"] for r in done if "ttft_s" in r]
        rows[model] = {
            "requests": len(rs), "completed": len(done),
            "rejected_429": sum(r["outcome"] == "rejected" for r in rs),
            "failed": sum(r["outcome"] == "failed" for r in rs),
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "reject_p50_ms": pct([r["latency_s"] for r in rs if r["outcome"] == "rejected"], 0.5),
            "completion_tokens": sum(r.get("completion_tokens", 0) for r in done),
        }
    rows["all"]["tokens_per_s"] = round(rows["all"]["completion_tokens"] / wall, 1)
    return rows


def markdown(command: str, args, summary: dict, memory: list[dict], failures: list[dict], meta: dict) -> str:
    cols = ["requests", "completed", "rejected_429", "failed", "p50_ms", "p99_ms",
            "ttft_p50_ms", "ttft_p99_ms", "reject_p50_ms", "completion_tokens"]
    lines = [f"# mlxd load test\n\n`{command}`\n",
             f"{args.requests} streamed chat requests from {args.clients} concurrent clients over two models "
             f"(max_batch_size {args.batch}, max_waiting {args.max_waiting}); prompts of "
             f"{'/'.join(map(str, PROMPT_WORDS))} words, max_tokens {'/'.join(map(str, MAX_TOKENS))}. "
             f"Wall {meta['wall_s']} s, {summary['all']['tokens_per_s']} generated tokens/s, "
             f"load average before: {meta['loadavg']}. Latencies are of completed requests.\n",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for model, row in summary.items():
        lines.append(f"| {model} | " + " | ".join(str(row[c]) for c in cols) + " |")
    lines += ["", "| process | pid | peak RSS (MiB, sampled 0.2 s) | VmHWM (MiB) |", "|---|---|---|---|"]
    lines += [f"| {m['process']} | {m['pid']} | {m['peak_rss_mib']} | {m['vm_hwm_mib']} |" for m in memory]
    lines += ["", f"Failures: {len(failures)}"]
    lines += [f"- #{f['i']} {f['model']}: status {f.get('status')}, {f.get('error')}" for f in failures]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="max_batch_size of each model")
    p.add_argument("--max-waiting", type=int, default=24,
                   help="queue beyond the batch before 429: 2 x (8 + 24) = 64 slots, so 429 comes from imbalance")
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    p.add_argument("--deadline", type=float, default=900, help="the whole run, seconds")
    args = p.parse_args()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "ops/bench/load.py", *sys.argv[1:]])

    engine = {"max_batch_size": args.batch, "max_waiting": args.max_waiting}
    d = Mlxd(Path(tempfile.mkdtemp(prefix="mlxd-load-")), [smol(m, engine=engine) for m in MODELS],
             name="daemon", log_level="info")
    meta = {"loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    d.start()
    sampler = RssSampler(d)
    sampler.start()
    try:
        t0 = time.perf_counter()
        records = asyncio.run(drive(d.url, plan(args.requests), args.clients, args.timeout, args.deadline))
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        meta["restarts"] = {m["name"]: m["restarts"] for m in d.status()["models"]}
    finally:
        sampler.stop.set()
        sampler.join()
        d.stop()
    assert len(records) == args.requests, f"{len(records)} of {args.requests} requests accounted for"
    summary, memory = summarize(records, meta["wall_s"]), sampler.table()
    failures = [r for r in records if r["outcome"] == "failed"]
    report = markdown(command, args, summary, memory, failures, meta)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.md").write_text(report)
    (RESULTS / "load.json").write_text(json.dumps(
        {"command": command, "args": vars(args), **meta, "summary": summary, "memory": memory,
         "failures": failures, "requests": records}, indent=1))
    print(report)
    print(f"daemon log: {d.log_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
