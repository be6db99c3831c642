"""What mlxd costs over raw mlx-lm, and how it compares with mlx_lm.server, in one run.

(a) single-stream decode through mlxd vs `mlx_lm.stream_generate` in a bare process, same
    weights, prompt and environment (OpenBLAS preloaded in both): the daemon's overhead.
(b) prefill and decode of mlxd as the README sets it up (f32 + OpenBLAS) vs mlx_lm.server as
    `pip install mlx-lm` gives it (reference BLAS): what a user switching to mlxd sees.
(c) aggregate generated tokens/s at 1/4/8/16 concurrent streams, mlxd vs mlx_lm.server, both
    with OpenBLAS: the batching engines compared on equal footing.

All contenders are up at once but only one computes at a time: repetitions go round-robin
(mlxd, raw, mlx_lm.server, ...), so load from other processes on this shared 2-core box
falls on all of them alike instead of on whichever happened to run during it.
Run: .venv/bin/python ops/bench/overhead.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (InProc, cpu_seconds, load_now, median, mlx_lm_server, mlxd, model_dir, publish, serve_inproc,  # noqa: E402
                    stream_chat, wait_quiet)

DECODE_PROMPT = "Write a long, detailed essay about the history of computing, from the abacus to modern GPUs."
MAX_TOKENS = 128
REPS = 5                      # decode: the noisiest measurement on a shared box
PREFILL_REPS = 3
PLAIN_PREFILL_REPS = 1        # mlx_lm.server on the reference BLAS prefills ~1000 tokens in minutes
CONC_REPS = 2
CONCURRENCY = (1, 4, 8, 16)
PREFILL_TOKENS = 1000
# config.example.yaml with dtype pinned to f32 (what `auto` picks on CPU) and a batch of 16 for (c)
MLXD_CFG = {"dtype": "float32",
            "engine": {"max_batch_size": 16, "prefill_batch_size": 4, "prefill_step_size": 512},
            "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512},
            "prefix_cache": {"enabled": True, "memory_budget": "1GiB", "disk_budget": "8GiB", "kv_bits": None}}
MLXD, RAW, RAWBG, PEER, PLAIN = "mlxd", "raw", "raw BatchGenerator", "mlx_lm.server", "mlx_lm.server (pip)"


def decode_messages(i: int | None = None) -> list[dict]:
    tag = f"Essay #{i}. " if i is not None else ""
    return [{"role": "user", "content": tag + DECODE_PROMPT}]


def prefill_messages(tokenizer, tag: str) -> list[dict]:
    """~PREFILL_TOKENS of Python source behind a unique tag, so no two prompts share more than the template head."""
    import inspect
    import json as json_mod

    code = inspect.getsource(json_mod.decoder) + inspect.getsource(json_mod.encoder)
    ids = tokenizer.encode(code)[: PREFILL_TOKENS - 40]
    return [{"role": "user", "content": f"Request {tag}-{time.time_ns()}: explain this code.\n\n" + tokenizer.decode(ids)}]


def decode_run(who, msgs, pids: dict, op: str = "decode") -> dict:
    """One greedy MAX_TOKENS run, with the CPU time its processes burnt per generated token
    (less sensitive to other load than wall time: it shows work the daemon adds, not waiting)."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    if isinstance(who, InProc):
        r = who.call({"op": op, "messages": msgs, "max_tokens": MAX_TOKENS})
    else:
        r = stream_chat(who, msgs, MAX_TOKENS, timeout=600)
        r = {k: r[k] for k in ("decode_tps", "completion_tokens", "ttft")}
    r["cpu_ms_per_token"] = {k: 1000 * (cpu_seconds(p) - before[k]) / r["completion_tokens"] for k, p in pids.items()}
    return r


def prefill_run(who, msgs) -> dict:
    if isinstance(who, InProc):
        return who.call({"op": "prefill", "messages": msgs})
    r = stream_chat(who, msgs, 4, timeout=600)
    new = r["prompt_tokens"] - (r["cached_tokens"] or 0)
    return {"ttft": r["ttft"], "prompt_tokens": r["prompt_tokens"], "cached_tokens": r["cached_tokens"],
            "prefill_tps": new / r["ttft"]}


def concurrent(server, n: int, rep: int) -> dict:
    """Aggregate completion tokens/s of n simultaneous streams, distinct prompts."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda i: stream_chat(server, decode_messages(1000 * rep + i), MAX_TOKENS, timeout=600),
                             range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r["completion_tokens"] for r in runs)
    return {"wall": wall, "tokens": tokens, "agg_tps": tokens / wall,
            "per_stream_decode_tps": median(r["decode_tps"] for r in runs), "ttft_max": max(r["ttft"] for r in runs)}


# -- the raw side, in its own process with OpenBLAS preloaded -------------------------------

def raw_worker(payload: dict) -> None:
    """mlx_lm.stream_generate on request: decode timed per token, prefill as time to the first token."""
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    from daemon.worker.blas import loaded_blas

    model, tok = load(payload["model_dir"])
    greedy = make_sampler(0.0)
    list(stream_generate(model, tok, tok.apply_chat_template(decode_messages(), add_generation_prompt=True),
                         max_tokens=16, sampler=greedy))          # warm-up

    def batchgen_decode(prompt, max_tokens, t0):
        """The same prompt through mlx-lm's BatchGenerator alone, set up as mlxd's engine sets it up."""
        gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in sorted(tok.eos_token_ids)],
                             completion_batch_size=16, prefill_batch_size=4, prefill_step_size=512)
        gen.insert([prompt], max_tokens=[max_tokens])
        token_t, finished = [], False
        while not finished:
            for r in gen.next()[1]:
                token_t.append(time.perf_counter())
                finished = r.finish_reason is not None
        gen.close()
        n = len(token_t)
        return {"decode_tps": (n - 1) / (token_t[-1] - token_t[0]), "completion_tokens": n, "ttft": token_t[0] - t0}

    def handle(req):
        prompt = tok.apply_chat_template(req["messages"], add_generation_prompt=True)
        t0 = time.perf_counter()
        if req["op"] == "prefill":
            next(iter(stream_generate(model, tok, prompt, max_tokens=1, sampler=greedy)))
            ttft = time.perf_counter() - t0
            return {"ttft": ttft, "prompt_tokens": len(prompt), "prefill_tps": len(prompt) / ttft}
        if req["op"] == "batchgen":
            return batchgen_decode(prompt, req["max_tokens"], t0)
        token_t, text_t = [], []
        for r in stream_generate(model, tok, prompt, max_tokens=req["max_tokens"], sampler=greedy):
            token_t.append(time.perf_counter())
            if r.text:
                text_t.append(token_t[-1])
        n = len(token_t)
        return {"decode_tps": (n - 1) / (token_t[-1] - token_t[0]), "completion_tokens": n,
                "decode_tps_text_chunks": (n - 1) / (text_t[-1] - text_t[0]), "ttft": token_t[0] - t0,
                "mlx_lm_generation_tps": r.generation_tps}

    serve_inproc(handle, {"blas": loaded_blas()})


# -- report ---------------------------------------------------------------------------------

def fmt(x, d=1):
    return "n/a" if x is None else f"{x:.{d}f}"


def report(res: dict, cmd: str) -> str:
    dec = {k: median(r["decode_tps"] for r in v) for k, v in res["decode"].items()}
    pre = {k: median(r["prefill_tps"] for r in v) for k, v in res["prefill"].items()}
    best = {k: max(r["decode_tps"] for r in v) for k, v in res["decode"].items()}
    raw_chunks = median(r["decode_tps_text_chunks"] for r in res["decode"][RAW])
    conc = {k: {n: median(r["agg_tps"] for r in rounds) for n, rounds in v.items()} for k, v in res["conc"].items()}
    gates = [g["others_busy"] for g in res["gates"]]
    L = ["# mlxd overhead benchmark", "", f"Command: `{cmd}`", "",
         f"Model: SmolLM2-135M-Instruct f32 (`{res['model_dir']}`), greedy, {MAX_TOKENS} new tokens. Medians of "
         f"{REPS} round-robin decode and {PREFILL_REPS} prefill repetitions ({PLAIN_PREFILL_REPS} prefill for the "
         "reference-BLAS server), "
         f"{CONC_REPS} for (c). Host: {res['host']}. Took {res['seconds'] / 60:.1f} min.", "",
         f"Shared machine: load average {res['load_start']} at start, {res['load_end']} at end; before "
         f"{len(gates)} rounds other processes kept the CPUs {min(gates):.0%}-{max(gates):.0%} busy "
         f"(median {median(gates):.0%}; each round waited up to {res['quiet_wait']:.0f} s for them to go idle).", "",
         "## (a) Single-stream decode: mlxd vs raw mlx_lm.stream_generate (both OpenBLAS)", "",
         "| | decode tok/s |", "|---|---|",
         f"| raw stream_generate, timed per token | {fmt(dec[RAW])} |",
         f"| raw stream_generate, timed per text chunk (as a streaming client sees it) | {fmt(raw_chunks)} |",
         f"| raw mlx-lm BatchGenerator, one sequence, as mlxd's engine sets it up | {fmt(dec[RAWBG])} |",
         f"| mlxd (SSE, timed per content chunk) | {fmt(dec[MLXD])} |",
         f"| **ratio mlxd / raw** | **{dec[MLXD] / dec[RAW]:.3f}** (target >= 0.95; {dec[MLXD] / raw_chunks:.3f} "
         "against chunk timing) |",
         f"| best of {REPS}: mlxd / raw (least disturbed run of each) | {best[MLXD]:.1f} / {best[RAW]:.1f} = "
         f"{best[MLXD] / best[RAW]:.3f} |",
         f"| ratio mlxd / raw BatchGenerator (what the daemon itself adds) | {dec[MLXD] / dec[RAWBG]:.3f} |", "",
         "CPU time per generated token (ms, median; all threads of the process): " + "; ".join(
             f"{k} " + ", ".join(f"{part} {median(r['cpu_ms_per_token'][part] for r in v):.1f}"
                                 for part in v[0]["cpu_ms_per_token"]) for k, v in res["decode"].items()) + ".", "",
         "Each run's tok/s, in order: " + "; ".join(
             f"{k} " + ", ".join(f"{r['decode_tps']:.1f}" for r in v) for k, v in res["decode"].items()) + ".", "",
         "## (b) mlxd as the README sets it up vs mlx_lm.server as pip gives it", "",
         f"Prefill: ~{PREFILL_TOKENS}-token prompt, unique per request; tok/s = (prompt - cached tokens) / TTFT "
         "(TTFT includes the first decoded token and, for servers, HTTP).", "",
         "| | BLAS | prefill tok/s | decode tok/s |", "|---|---|---|---|",
         f"| mlxd (f32, daemon preloads OpenBLAS) | openblas | {fmt(pre[MLXD])} | {fmt(dec[MLXD])} |",
         f"| mlx_lm.server, plain pip venv, no LD_PRELOAD | reference | {fmt(pre[PLAIN])} | {fmt(dec[PLAIN])} |",
         f"| **mlxd / mlx_lm.server as pip gives it** | | **{pre[MLXD] / pre[PLAIN]:.1f}x** | "
         f"**{dec[MLXD] / dec[PLAIN]:.2f}x** |",
         f"| for reference: mlx_lm.server with LD_PRELOAD=OpenBLAS | openblas | {fmt(pre[PEER])} | {fmt(dec[PEER])} |",
         f"| for reference: raw mlx-lm with OpenBLAS | openblas | {fmt(pre[RAW])} | {fmt(dec[RAW])} |", "",
         "## (c) Aggregate generated tokens/s, N concurrent streams (both OpenBLAS, mlxd max_batch_size 16)", "",
         "| streams | mlxd tok/s | mlx_lm.server tok/s | mlxd / mlx_lm.server |", "|---|---|---|---|"]
    for n in CONCURRENCY:
        a, b = conc[MLXD][n], conc[PEER][n]
        L.append(f"| {n} | {fmt(a)} | {fmt(b)} | {a / b:.2f} |")
    L += ["", "Start-up until ready (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["startup"].items()) + ".", ""]
    return "\n".join(L)


# -- the run --------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", help=argparse.SUPPRESS)   # internal: the raw mlx-lm process
    ap.add_argument("--quick", action="store_true", help="smoke-test the harness (tiny sizes, numbers meaningless)")
    args = ap.parse_args()
    if args.raw:
        import json
        raw_worker(json.loads(args.raw))
        return 0
    global MAX_TOKENS, REPS, PREFILL_REPS, CONC_REPS, CONCURRENCY, PREFILL_TOKENS
    if args.quick:
        MAX_TOKENS, REPS, PREFILL_REPS, CONC_REPS, CONCURRENCY, PREFILL_TOKENS = 12, 2, 1, 1, (1, 2), 200
        common.QUIET_WAIT = 5.0
    else:
        common.QUIET_WAIT = 60.0

    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    mdir = model_dir().path
    tokenizer = AutoTokenizer.from_pretrained(str(mdir))
    res = {"model_dir": str(mdir), "host": f"{os.cpu_count()} CPU cores, no GPU", "load_start": load_now(),
           "quiet_wait": common.QUIET_WAIT, "startup": {}, "gates": [], "decode": {}, "prefill": {},
           "conc": {MLXD: {}, PEER: {}}}
    with tempfile.TemporaryDirectory(prefix="mlxd-bench-") as tmp:
        tmp = Path(tmp)
        servers = {MLXD: mlxd(tmp, MLXD_CFG), PEER: mlx_lm_server(tmp, mdir, preload=True, name="mlx_lm.server-openblas"),
                   PLAIN: mlx_lm_server(tmp, mdir, preload=False, name="mlx_lm.server-plain")}
        raw = None
        try:
            for name, s in servers.items():
                res["startup"][name] = s.start(timeout=300)
                stream_chat(s, [{"role": "user", "content": "Hello"}], 8, timeout=300)   # warm-up
            raw = InProc("--raw", {"model_dir": str(mdir)}, tmp)
            who = {**servers, RAW: raw}

            def rounds(label, n, names, fn, key):
                for rep in range(n):
                    res["gates"].append(wait_quiet())
                    for name in names[rep % len(names):] + names[:rep % len(names)]:   # rotate who goes first
                        if name == PLAIN and key == "prefill" and rep >= PLAIN_PREFILL_REPS:
                            continue
                        r = fn(name, rep)
                        res[key].setdefault(name, []).append(r)
                        print(f"  {label} rep {rep + 1} {name}: {r.get(key + '_tps') or r.get('agg_tps'):.1f} tok/s",
                              flush=True)

            worker = httpx.get(f"{servers[MLXD].url}/v1/status", timeout=10).json()["models"][0]["pid"]
            pids = {MLXD: {"api": servers[MLXD].proc.pid, "worker": worker}, RAW: {"process": raw.proc.pid},
                    RAWBG: {"process": raw.proc.pid}, PEER: {"server": servers[PEER].proc.pid},
                    PLAIN: {"server": servers[PLAIN].proc.pid}}
            who[RAWBG] = raw
            rounds("decode", REPS, (MLXD, RAW, RAWBG, PEER, PLAIN),
                   lambda name, rep: decode_run(who[name], decode_messages(), pids[name],
                                                "batchgen" if name == RAWBG else "decode"), "decode")
            rounds("prefill", PREFILL_REPS, (MLXD, RAW, PEER, PLAIN),
                   lambda name, rep: prefill_run(who[name], prefill_messages(tokenizer, f"{rep}")), "prefill")
            servers[PLAIN].stop()
            for n in CONCURRENCY:
                for rep in range(CONC_REPS):
                    res["gates"].append(wait_quiet())
                    for name in ((MLXD, PEER) if rep % 2 == 0 else (PEER, MLXD)):
                        r = concurrent(servers[name], n, rep)
                        res["conc"][name].setdefault(n, []).append(r)
                        print(f"  x{n} rep {rep + 1} {name}: {r['agg_tps']:.1f} tok/s", flush=True)
        finally:
            if raw is not None:
                res["raw_blas"] = raw.info
                raw.close()
            for s in servers.values():
                s.stop()
    publish("overhead", res, report, t_start, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
