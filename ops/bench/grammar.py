"""Constrained decoding benchmark: what a grammar costs a request and its batch neighbours.

In-process, on mlxd's own Engine (mlx-lm BatchGenerator + the grammar processor), SmolLM2 f32
with OpenBLAS, greedy:
(a) one sequence: decode tok/s unconstrained vs under a json_schema (an object with one long
    string, minLength past max_tokens, so both decode the same number of tokens);
(b) a batch of 4: all unconstrained vs one constrained + three unconstrained: the
    neighbours' tok/s (the batch must not slow down for them) and the constrained one's;
(c) fixed costs: building the llguidance tokenizer (once per worker), compiling a schema,
    and the processor's own work per token (consume + mask + apply, no model).
Decode tok/s is (tokens - 1) / time from the first token to the last (the engine's
inter-token latencies), so prefill and compilation are not in it. Configurations alternate
round-robin, so load from other processes falls on all of them alike.
Run: .venv/bin/python ops/bench/grammar.py [--reps N] [--tokens N]   (about 4 minutes on a quiet box)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import OPENBLAS, load_now, median, model_dir, publish  # noqa: E402

MAX_TOKENS = 128
REPS = 3
ESSAY = {"type": "json_schema", "json_schema": {"name": "essay", "schema": {
    "type": "object", "properties": {"essay": {"type": "string", "minLength": 4000}}, "required": ["essay"],
    "additionalProperties": False}}}
PROMPT = "Write a long, detailed essay about the history of computing, from the abacus to modern GPUs."
COMPILE_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"pet": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog"]}, "tags": {"type": "array", "items": {"type": "string"}}}}}},
]


def run(engine, requests: list[dict]) -> dict[str, dict]:
    """Submit all, step until all are done; the `done` event of each, with its text and the
    CPU time (all threads of this process) per generated token of the whole run."""
    cpu0 = time.process_time()
    texts: dict[str, str] = {}
    done: dict[str, dict] = {}
    for r in requests:
        engine.submit({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS, **r})
    while len(done) < len(requests):
        if not engine.busy:
            time.sleep(0.001)
            continue
        for ev in engine.step():
            if ev["op"] == "text":
                texts[ev["id"]] = texts.get(ev["id"], "") + ev["text"]
            elif ev["op"] in ("done", "error"):
                done[ev["id"]] = {**ev, "text": texts.get(ev["id"], "")}
    cpu_ms = 1000 * (time.process_time() - cpu0) / (MAX_TOKENS * len(requests))
    for ev in done.values():
        assert ev["op"] == "done" and ev["usage"]["completion_tokens"] == MAX_TOKENS, ev
        ev["cpu_ms_per_token"] = cpu_ms
    return done


def decode_tps(ev: dict) -> float:
    return len(ev["itl"]) / sum(ev["itl"])


def processor_cost(model, tokenizer, n: int) -> float:
    """Microseconds per token of the processor alone, on fixed logits, walking a valid output."""
    import mlx.core as mx

    from daemon.worker.grammar import Compiler, GrammarProcessor, json_schema_grammar

    vocab = model.args.vocab_size
    text = '{"essay": "' + "The history of computing begins with the abacus. " * 40
    ids = tokenizer.encode(text, add_special_tokens=False)[:n]
    matcher = Compiler(tokenizer, vocab).compile(json_schema_grammar(ESSAY["json_schema"]["schema"]), "x").result()
    proc = GrammarProcessor(matcher, vocab, tokenizer.eos_token_id)
    logits = mx.random.normal((1, vocab))
    ctx = tokenizer.encode("prompt")
    seq = mx.array(ctx + ids)
    mx.eval(seq, proc(seq[: len(ctx)], logits))
    t = time.perf_counter()
    for i in range(len(ids)):
        mx.eval(proc(seq[: len(ctx) + i + 1], logits))
    assert proc.error is None, proc.error
    return 1e6 * (time.perf_counter() - t) / len(ids)


def measure(quick: bool, reps: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load

    from daemon.worker.blas import loaded_blas
    from daemon.worker.engine import Engine
    from daemon.worker.grammar import Compiler, json_schema_grammar

    reps = 1 if quick else reps
    resolved = model_dir()
    model, tokenizer = load(str(resolved.path))
    res = {"model": str(resolved.path), "blas": loaded_blas(), "device": str(mx.default_device()),
           "max_tokens": MAX_TOKENS, "reps": reps, "load_start": load_now()}

    t = time.perf_counter()
    compiler = Compiler(tokenizer, model.args.vocab_size)
    compiler.compile(json_schema_grammar({"type": "object"}), "x").result()
    res["tokenizer_build_s"] = time.perf_counter() - t
    times = []
    for s in COMPILE_SCHEMAS * 5:
        t = time.perf_counter()
        compiler.compile(json_schema_grammar(s), "x").result()
        times.append(time.perf_counter() - t)
    res["compile_ms"] = 1000 * median(times)
    res["processor_us_per_token"] = processor_cost(model, tokenizer, 16 if quick else 200)

    def engine(batch: int) -> Engine:
        return Engine(model, tokenizer, max_batch_size=batch, prefill_batch_size=batch, prefill_step_size=512,
                      context_length=2048, default_max_tokens=MAX_TOKENS)

    single = {"plain": [], "constrained": []}
    cpu = {"plain": [], "constrained": []}
    batch = {"plain x4": [], "neighbours of 1 constrained": [], "the constrained one": [],
             "aggregate plain x4": [], "aggregate 1 constrained + 3": []}
    eng = engine(4)
    eng.compiler = compiler         # built above: its one-off cost is (c), not (a)
    run(eng, [{"id": "warm"}])
    for rep in range(reps):
        print(f"rep {rep + 1}/{reps} (load {load_now()})", flush=True)
        for kind, req in (("plain", {"id": "x"}), ("constrained", {"id": "x", "response_format": ESSAY})):
            ev = run(eng, [req])["x"]
            single[kind].append(decode_tps(ev))
            cpu[kind].append(ev["cpu_ms_per_token"])
        out = run(eng, [{"id": f"p{i}"} for i in range(4)])
        batch["plain x4"].append(median([decode_tps(e) for e in out.values()]))
        batch["aggregate plain x4"].append(sum(decode_tps(e) for e in out.values()))
        out = run(eng, [{"id": "c", "response_format": ESSAY}] + [{"id": f"p{i}"} for i in range(3)])
        assert out["c"]["text"].startswith('{"essay": "') or out["c"]["text"].startswith("{"), out["c"]["text"]
        batch["neighbours of 1 constrained"].append(median([decode_tps(out[f"p{i}"]) for i in range(3)]))
        batch["the constrained one"].append(decode_tps(out["c"]))
        batch["aggregate 1 constrained + 3"].append(sum(decode_tps(e) for e in out.values()))
    res["single"] = {k: {"runs": v, "median": median(v)} for k, v in single.items()}
    res["cpu_ms_per_token"] = {k: {"runs": v, "median": median(v)} for k, v in cpu.items()}
    res["ratio_cpu"] = res["cpu_ms_per_token"]["plain"]["median"] / res["cpu_ms_per_token"]["constrained"]["median"]
    res["batch"] = {k: {"runs": v, "median": median(v)} for k, v in batch.items()}
    res["ratio_single"] = res["single"]["constrained"]["median"] / res["single"]["plain"]["median"]
    res["ratio_single_best"] = max(single["constrained"]) / max(single["plain"])
    res["ratio_single_paired"] = median([c / p for c, p in zip(single["constrained"], single["plain"])])
    step_us = 1e6 / max(single["plain"])
    res["processor_share_of_step"] = res["processor_us_per_token"] / step_us
    res["ratio_neighbours"] = (res["batch"]["neighbours of 1 constrained"]["median"]
                               / res["batch"]["plain x4"]["median"])
    res["ratio_in_batch"] = res["batch"]["the constrained one"]["median"] / res["batch"]["plain x4"]["median"]
    res["sample"] = out["c"]["text"][:120]
    return res


def report(res: dict, command: str) -> str:
    s, b, c = res["single"], res["batch"], res["cpu_ms_per_token"]
    runs = lambda v: ", ".join(f"{x:.1f}" for x in v["runs"])  # noqa: E731
    lines = [
        "# Constrained decoding benchmark", "",
        f"Command: `{command}{res['flags']}`", "",
        f"Model: SmolLM2-135M-Instruct f32 (`{res['model']}`), {res['device']}, BLAS {res['blas']}, greedy, "
        f"{res['max_tokens']} new tokens per request, medians of {res['reps']} round-robin repetitions. "
        f"Load average {res['load_start']} at start, {res['load_end']} at end (2 shared cores). "
        f"Took {res['seconds'] / 60:.1f} min.", "",
        "## (a) One sequence", "",
        "| | decode tok/s | runs |", "|---|---|---|",
        f"| unconstrained | {s['plain']['median']:.1f} | {runs(s['plain'])} |",
        f"| json_schema (llguidance mask every token) | {s['constrained']['median']:.1f} | {runs(s['constrained'])} |",
        f"| **ratio constrained / unconstrained** | **{res['ratio_single']:.3f}** (target >= 0.9) | |",
        f"| best of {res['reps']}: ratio of the least disturbed runs | {res['ratio_single_best']:.3f} | |",
        f"| median of the per-repetition ratios (each pair run back to back) | {res['ratio_single_paired']:.3f} | |",
        "",
        f"The processor's own work, {res['processor_us_per_token']:.0f} us per token ((c)), is "
        f"{100 * res['processor_share_of_step']:.1f}% of the fastest unconstrained step here: on a quiet box "
        "that bounds the slowdown; the spread above is other processes' load.", "",
        "CPU time of this process (all threads) per generated token, ms: unconstrained "
        f"{c['plain']['median']:.1f} ({runs(c['plain'])}), constrained {c['constrained']['median']:.1f} "
        f"({runs(c['constrained'])}); **unconstrained / constrained = {res['ratio_cpu']:.3f}** (less "
        "sensitive than wall time to other processes' load: it is the work each token costs).", "",
        "## (b) A batch of 4", "",
        "| | tok/s per request | runs |", "|---|---|---|",
        f"| 4 unconstrained | {b['plain x4']['median']:.1f} | {runs(b['plain x4'])} |",
        f"| 3 unconstrained beside 1 constrained | {b['neighbours of 1 constrained']['median']:.1f} | "
        f"{runs(b['neighbours of 1 constrained'])} |",
        f"| the constrained one | {b['the constrained one']['median']:.1f} | {runs(b['the constrained one'])} |",
        f"| **neighbours / all-unconstrained** | **{res['ratio_neighbours']:.3f}** | |",
        f"| **constrained / all-unconstrained** | **{res['ratio_in_batch']:.3f}** | |", "",
        f"Aggregate tok/s: 4 unconstrained {b['aggregate plain x4']['median']:.1f}, "
        f"1 constrained + 3 {b['aggregate 1 constrained + 3']['median']:.1f}.", "",
        "## (c) Fixed costs", "",
        f"- llguidance tokenizer, built once per worker on the first constrained request: "
        f"{res['tokenizer_build_s']:.2f} s (on the compiler's thread, not the engine's)",
        f"- compiling a small JSON schema into a matcher: {res['compile_ms']:.2f} ms (median)",
        f"- the processor's own work per token (consume, mask, apply, eval; no model): "
        f"{res['processor_us_per_token']:.0f} us", "",
        f"Sample constrained output: `{res['sample']}`", "",
    ]
    return "\n".join(lines)


def main() -> int:
    global MAX_TOKENS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test the harness (numbers meaningless)")
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--tokens", type=int, default=MAX_TOKENS, help="new tokens per request")
    args = ap.parse_args()
    import os

    if OPENBLAS not in os.environ.get("LD_PRELOAD", "") and Path(OPENBLAS).exists():
        os.environ["LD_PRELOAD"] = OPENBLAS            # as the daemon runs its workers
        os.execv(sys.executable, [sys.executable, *sys.argv])
    t0 = time.perf_counter()
    MAX_TOKENS = args.tokens
    res = measure(args.quick, args.reps)
    res["flags"] = "".join(f" --{k} {v}" for k, v in (("reps", args.reps), ("tokens", args.tokens))
                           if v != {"reps": REPS, "tokens": 128}[k])
    publish("grammar", res, report, t0, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
