"""Speculative-decoding benchmark (issue 16): prompt-lookup drafts on vs off, same model, one run.

One mlxd with two entries on the same weights: `smol` (speculation off) and `smol-spec`
(`engine.speculative: {mode: prompt_lookup, max_draft, ngram}`; `--max-draft 4,8` adds one
entry per value, `smol-spec-d4`, `smol-spec-d8`, to sweep it in the same run).
(a) edit: the model is asked to repeat 60 lines of Python (a class: SmolLM2-135M repeats no
    60-line function we tried, see speculative_edit.py) with one named line changed; each
    repetition names another line. Decode tok/s per request and how many lines of the expected
    code the answer repeats: a model that does not copy gives prompt lookup nothing to find,
    and the ratio then says nothing about edits.
(b) prose: a short story, nothing in the prompt to copy (256 tokens: longer, the model loops).
(c) 8 concurrent streams of (a), each with its own edit: aggregate decode tok/s.
(d) mlx_lm.server on (a) in its best single-stream configuration here (`--peer`; plain by
    default: with no smaller model than SmolLM2-135M, a self-draft spends a full forward pass
    per drafted token, see the README).
Decode tok/s = completion tokens / (end of stream - first content chunk), streamed through the
openai SDK with usage; greedy, fixed max_tokens. Acceptance = accepted / drafted tokens from
mlxd's `mlxd_spec_*_tokens_total` counters, diffed around each request. Variants take each
repetition in turn, rotating who goes first, after waiting for other processes to go quiet;
medians are reported. Run: .venv/bin/python ops/bench/speculative.py   (~15-20 min quiet)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))   # this checkout's daemon package
import common  # noqa: E402
from common import (Server, cpu_seconds, load_now, median, mlx_lm_server, mlxd, model_dir, publish,  # noqa: E402
                    wait_quiet)
from prefix import fmt, log_digest, ratio, settle  # noqa: E402
from speculative_edit import EDITS, copied, edit_messages  # noqa: E402

MAX_TOKENS = 700          # the code is ~480 tokens; room for its fences and a few sentences around it
REPS = 3
CONC = 8
CONC_REPS = 2
REQUEST_TIMEOUT = 900
TARGET_A, TARGET_B, TARGET_C = 2.0, 0.97, 1.5
OFF = "smol"
PEER = "mlx_lm.server"
ENGINE = {"max_batch_size": CONC, "prefill_batch_size": 4, "prefill_step_size": 512}
PREFIX_CACHE = {"enabled": True, "memory_budget": "256MiB", "disk_budget": "2GiB", "kv_bits": None}
# (b) stops at PROSE_TOKENS: past ~300 tokens SmolLM2's greedy stories fall into loops (74% of the
# 8-word runs of 700-token answers repeated earlier ones), which prompt lookup drafts from as if
# there were something to copy. Of ten topics, these three stay loop-free (<= 5%) for 256 tokens.
PROSE_TOKENS = 256
STORIES = ("a lighthouse keeper who finds a message in a bottle", "two rival chess players stuck in a snowed-in train",
           "a boy who trains a dragon to deliver mail")


def prose_messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {STORIES[i % len(STORIES)]}."}]


def spec_name(d: int | None, sweep: bool) -> str:
    return f"smol-spec-d{d}" if sweep else "smol-spec"


def spec_counters(server: Server) -> dict:
    """{model: (drafted, accepted)} from mlxd's /metrics; empty where the daemon has no such counters."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("mlxd_spec_draft_tokens_total", "mlxd_spec_accepted_tokens_total"):
                d, a = out.get(s.labels.get("model"), (0.0, 0.0))
                out[s.labels.get("model")] = (d + s.value, a) if "draft" in s.name else (d, a + s.value)
    return out


def stream(server: Server, model: str, messages: list[dict], max_tokens: int, extra: dict | None = None) -> dict:
    """One greedy streamed chat completion through the openai SDK, usage included."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", timeout=REQUEST_TIMEOUT, max_retries=0)
    t0 = time.perf_counter()
    first, parts, usage, finish = None, [], None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0.0, stream=True, stream_options={"include_usage": True},
                                                extra_body=extra):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            if ch.delta.content:
                first = first or time.perf_counter()
                parts.append(ch.delta.content)
    end = time.perf_counter()
    n = usage.completion_tokens if usage else None
    return {"ttft": first - t0 if first else None, "total": end - t0, "completion_tokens": n,
            "decode_tps": n / (end - first) if first and n and end > first else None,
            "prompt_tokens": usage.prompt_tokens if usage else None, "finish_reason": finish, "text": "".join(parts),
            "start": t0, "first": first, "end": end}


class Variant:
    """One contender: a model on mlxd, or mlx_lm.server with (`draft`) or without a self-draft."""

    def __init__(self, name: str, server: Server, model: str, extra: dict | None = None):
        self.name, self.server, self.model, self.extra = name, server, model, extra
        self.is_mlxd = server.name == "mlxd"
        self.pid = None       # the process that computes: the model's worker, or the peer server

    def find_pid(self) -> None:
        self.pid = self.server.proc.pid
        if self.is_mlxd:
            models = httpx.get(f"{self.server.url}/v1/status", timeout=30).json()["models"]
            self.pid = next(m["pid"] for m in models if m["name"] == self.model)

    def run(self, messages: list[dict], max_tokens: int) -> dict:
        return stream(self.server, self.model, messages, max_tokens, self.extra)

    def snap(self) -> dict:
        return {"spec": spec_counters(self.server).get(self.model) if self.is_mlxd else None,
                "cpu": cpu_seconds(self.pid)}


def repeated(text: str, n: int = 8) -> float:
    """Share of the answer's word n-grams it already wrote earlier: where a small model loops,
    prompt lookup drafts from its own output, even on a task with nothing to copy."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    seen: set = set()
    again = 0
    for g in grams:
        again += g in seen
        seen.add(g)
    return again / len(grams) if grams else 0.0


def work(before: dict, after: dict, tokens: int | None) -> dict:
    """Drafted and accepted tokens, and the computing process's CPU ms per generated token (the work
    a token costs: less sensitive than wall time to other processes' load on a shared box)."""
    out = {"cpu_ms_per_token": 1000 * (after["cpu"] - before["cpu"]) / tokens if tokens else None,
           "drafted": None, "accepted": None}
    if before["spec"] is not None and after["spec"] is not None:
        out.update(drafted=after["spec"][0] - before["spec"][0], accepted=after["spec"][1] - before["spec"][1])
    return out


def one(v: Variant, messages: list[dict], max_tokens: int, edit: int | None) -> dict:
    before = v.snap()
    r = v.run(messages, max_tokens)
    r.update(work(before, v.snap(), r["completion_tokens"]))
    if edit is not None:
        r["copy"] = copied(edit, r["text"])
    r["text_sha1"] = hashlib.sha1(r["text"].encode()).hexdigest()     # compared whole, kept in part
    r["repeated"] = repeated(r["text"])
    r["text"] = r["text"][:4000]
    for k in ("start", "first", "end"):
        r.pop(k)
    return r


def concurrent(v: Variant, n: int, rep: int, max_tokens: int) -> dict:
    """n streams of (a) at once, edits rep*n .. rep*n+n-1: aggregate decode tok/s = all completion
    tokens / (last end - first content chunk of any stream), plus the same over the whole wall time."""
    before = v.snap()
    barrier = threading.Barrier(n)

    def go(i):
        barrier.wait()
        return stream(v.server, v.model, edit_messages(rep * n + i), max_tokens, v.extra), rep * n + i

    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(go, range(n)))
    rs = [r for r, _ in runs]
    tokens = sum(r["completion_tokens"] or 0 for r in rs)
    start, end = min(r["start"] for r in rs), max(r["end"] for r in rs)
    first = min(r["first"] for r in rs if r["first"])
    return {"tokens": tokens, "agg_decode_tps": tokens / (end - first), "agg_wall_tps": tokens / (end - start),
            "wall": end - start, "ttft_max": max(r["ttft"] or 0 for r in rs),
            "per_stream_decode_tps": median(r["decode_tps"] for r in rs),
            "copy": [copied(i, r["text"]) for r, i in runs], **work(before, v.snap(), tokens)}


# -- report ---------------------------------------------------------------------------------

def med(runs: list[dict], key: str = "decode_tps"):
    return median([r.get(key) for r in runs])


def acc_text(runs: list[dict]) -> str:
    d, a = sum(r.get("drafted") or 0 for r in runs), sum(r.get("accepted") or 0 for r in runs)
    if not any(r.get("drafted") is not None for r in runs):   # not run, or no spec counters in /metrics
        return "n/a"
    return f"{a / d:.0%} ({a:.0f} of {d:.0f})" if d else "0 drafted"


def self_text(runs: list[dict]) -> str:
    """The median share of word 8-grams each answer had already written."""
    xs = [r["repeated"] if "repeated" in r else repeated(r["text"]) for r in runs]
    return f"{median(xs):.0%} of 8-word runs" if xs else ""


def cut_short(c: dict) -> bool:
    return c["lines_out"] < c["lines_expected"]


def copy_text(runs: list[dict]) -> str:
    cs = [c for r in runs for c in ([r["copy"]] if isinstance(r.get("copy"), dict) else r.get("copy") or [])]
    if not cs:
        return ""
    lines = [c["lines_matching"] for c in cs]
    cut = sum(map(cut_short, cs))
    return (f"{median(lines):.0f}/{cs[0]['lines_expected']} lines (min {min(lines)}, max {max(lines)}), "
            f"edit made {sum(c['edit_made'] for c in cs)}/{len(cs)}" + (f", {cut} cut short" if cut else ""))


def cpu_ratio(xs: dict, m: str) -> str:
    on, off = med(xs.get(m, []), "cpu_ms_per_token"), med(xs.get(OFF, []), "cpu_ms_per_token")
    return f"{fmt(ratio(off, on))}x" if on and off else "n/a"


def same_text(a: dict, b: dict, m: str) -> str:
    key = lambda r: r.get("text_sha1") or r["text"]  # noqa: E731
    pairs = [(key(x), key(y)) for xs in (a, b) for x, y in zip(xs.get(m, []), xs.get(OFF, []))]
    return f"{sum(x == y for x, y in pairs)}/{len(pairs)}"


def report(res: dict, cmd: str) -> str:
    a, b, c, spec = res["a"], res["b"], res["c"], res["spec_models"]
    gates = [g["others_busy"] for g in res["gates"]] or [0]
    L = ["# Speculative decoding benchmark (prompt lookup)", "", f"Command: `{cmd}`", "",
         f"Model: SmolLM2-135M-Instruct f32 on mlxd (`{OFF}`: speculation off; "
         + ", ".join(f"`{m}`: `{res['spec_cfg'][m] or 'speculation left out (--no-spec)'}`" for m in spec)
         + f") and on {res['peer_label']}; "
         f"OpenBLAS preloaded everywhere, greedy, max_tokens {res['max_tokens']} "
         f"({res.get('prose_tokens', res['max_tokens'])} for (b)). Medians of {res['reps']} "
         f"round-robin repetitions ({res['conc_reps']} for (c)). Took {res['seconds'] / 60:.1f} min.", "",
         f"Shared machine: load average {res['load_start']} at start, {res['load_end']} at end; before "
         f"{len(gates)} rounds other processes kept the CPUs {min(gates):.0%}-{max(gates):.0%} busy (median "
         f"{median(gates):.0%}; each round waited up to {res['quiet_wait']:.0f} s for them to go idle).", "",
         "## Summary", "", "| | target | " + " | ".join(spec) + " |", "|" + "---|" * (len(spec) + 2)]

    def row(label, target, fn):
        L.append(f"| {label} | {target} | " + " | ".join(fn(m) for m in spec) + " |")

    def r_of(xs, m, key="decode_tps"):
        if not xs:
            return "not run"
        on, off = med(xs.get(m, []), key), med(xs.get(OFF, []), key)
        return f"**{fmt(ratio(on, off))}x** ({fmt(on, 1)} vs {fmt(off, 1)} tok/s)"

    row("(a) edit: decode tok/s, on / off", f">= {TARGET_A}x", lambda m: r_of(a, m))
    row("(b) prose: decode tok/s, on / off", f">= {TARGET_B}x", lambda m: r_of(b, m))
    row(f"(c) {res['conc']} x (a): aggregate decode tok/s, on / off", f">= {TARGET_C}x",
        lambda m: r_of(c, m, "agg_decode_tps"))
    for p in res["peer_names"]:
        row(f"(d) (a): decode tok/s, on / {p}", "", lambda m: f"{fmt(ratio(med(a.get(m, [])), med(a[p])))}x "
            f"({fmt(med(a.get(m, [])), 1)} vs {fmt(med(a[p]), 1)} tok/s)" if a.get(p) else "not run")
    row("(a) / (b) / (c): CPU per token, off / on (the work saved; less noisy)", "",
        lambda m: " / ".join(cpu_ratio(xs, m) for xs in (a, b, c)))
    row("acceptance (a) / (b) / (c)", "", lambda m: " / ".join(acc_text(xs.get(m, [])) for xs in (a, b, c)))
    row("(a), (b): answers identical to speculation off (greedy)", "all", lambda m: same_text(a, b, m))
    L += ["", "## Per variant", "",
          "| task | variant | decode tok/s (median) | runs | TTFT (s, median) | CPU ms/token | tokens | "
          "repeats the code | repeats itself |", "|---|---|---|---|---|---|---|---|---|"]
    for task, xs in (("(a) edit", a), ("(b) prose", b)):
        for name, runs in xs.items():
            L.append(f"| {task} | {name} | {fmt(med(runs), 1)} | {', '.join(fmt(r['decode_tps'], 1) for r in runs)} | "
                     f"{fmt(med(runs, 'ttft'))} | {fmt(med(runs, 'cpu_ms_per_token'), 1)} | "
                     f"{', '.join(str(r['completion_tokens']) for r in runs)} | "
                     f"{copy_text(runs) if task.startswith('(a)') else ''} | {self_text(runs)} |")
    for name, runs in c.items():
        L.append(f"| (c) {res['conc']} streams | {name} | {fmt(med(runs, 'agg_decode_tps'), 1)} aggregate "
                 f"({fmt(med(runs, 'agg_wall_tps'), 1)} over the wall time, "
                 f"{fmt(med(runs, 'per_stream_decode_tps'), 1)} per stream) | "
                 f"{', '.join(fmt(r['agg_decode_tps'], 1) for r in runs)} | {fmt(med(runs, 'ttft_max'))} (max) | "
                 f"{fmt(med(runs, 'cpu_ms_per_token'), 1)} | "
                 f"{', '.join(str(r['tokens']) for r in runs)} | {copy_text(runs)} | |")
    cs = [r["copy"] for runs in a.values() for r in runs if r.get("copy")]
    # out of the lines it could have repeated: an answer cut at max_tokens ends in a partial line
    share = [x["lines_matching"] / max(1, min(x["lines_expected"], x["lines_out"] - cut_short(x)))
             for x in cs]
    if cs and median(share) < 0.8:
        L += ["", f"**The model does not repeat the code** (median {median([x['lines_matching'] for x in cs]):.0f} "
                  f"of {cs[0]['lines_expected']} lines): (a) and (c) then measure decoding of whatever it writes "
                  "instead (often a loop that prompt lookup can also draft from its own output), not an edit."]
    sample = next(iter(a.values()))[0]["text"] if a else ""
    L += ["", "Start-up until ready (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["startup"].items()) + ".", "",
          "First answer to (a), for the record:", "", "```", sample[:1500].replace("```", "'''"), "```", ""]
    if res["errors"]:
        L += [f"Failures: {res['errors']}", ""]
    return "\n".join(L)


# -- the run --------------------------------------------------------------------------------

def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke-test the harness (64 tokens, 1 repetition, 2 streams; numbers meaningless)")
    ap.add_argument("--max-draft", default="8",
                    help="comma-separated: one smol-spec entry per value (default 8, the engine's)")
    ap.add_argument("--ngram", default="2,16",
                    help="min,max length of the n-grams prompt lookup matches (default 2,16, the engine's)")
    ap.add_argument("--no-spec", action="store_true",
                    help="leave `engine.speculative` out of the smol-spec entries (proves the harness on a daemon "
                         "without the feature: every ratio should be ~1)")
    ap.add_argument("--peer", default="plain",
                    help="mlx_lm.server configurations on (a), comma-separated: plain, draft:N (self-draft with "
                         "N draft tokens), none")
    ap.add_argument("--tasks", default="a,b,c", help="which of a,b,c to run (default all; the peer runs in a)")
    ap.add_argument("--reps", type=int, help=f"repetitions of (a) and (b) (default {REPS})")
    ap.add_argument("--conc-reps", type=int, help=f"repetitions of (c) (default {CONC_REPS})")
    ap.add_argument("--quiet-wait", type=float, help="seconds to wait at most for other processes to go idle "
                                                     "before each round (default 60)")
    ap.add_argument("--tokens", type=int, help=f"max_tokens (default {MAX_TOKENS})")
    ap.add_argument("--report", metavar="JSON", help="only rewrite the report of a saved speculative.json, next to it")
    args = ap.parse_args()
    if args.report:
        path = Path(args.report)
        res = json.loads(path.read_text())
        (path.parent / "speculative.md").write_text(report(res, res.get("command", "")))
        return 0
    drafts, ngram = ints(args.max_draft), ints(args.ngram)
    max_tokens, reps, conc, conc_reps = MAX_TOKENS, REPS, CONC, CONC_REPS
    common.QUIET_WAIT = 60.0
    if args.quick:
        max_tokens, reps, conc, conc_reps, common.QUIET_WAIT = 64, 1, 2, 1, 3.0
    max_tokens, reps, conc_reps = args.tokens or max_tokens, args.reps or reps, args.conc_reps or conc_reps
    prose_tokens = min(PROSE_TOKENS, max_tokens)
    if args.quiet_wait is not None:
        common.QUIET_WAIT = args.quiet_wait
    peers = [p for p in args.peer.split(",") if p and p != "none"]

    t_start = time.perf_counter()
    mdir = model_dir().path
    sweep = len(drafts) > 1
    spec_cfg = {spec_name(d, sweep): None if args.no_spec else {"mode": "prompt_lookup", "max_draft": d,
                                                                 "ngram": ngram} for d in drafts}
    models = [{"name": OFF, "dtype": "float32", "engine": ENGINE, "prefix_cache": PREFIX_CACHE}]
    for name, cfg in spec_cfg.items():
        models.append({"name": name, "dtype": "float32", "prefix_cache": PREFIX_CACHE,
                       "engine": {**ENGINE, **({"speculative": cfg} if cfg else {})}})
    res = {"model_dir": str(mdir), "load_start": load_now(), "quiet_wait": common.QUIET_WAIT, "gates": [],
           "max_tokens": max_tokens, "prose_tokens": prose_tokens, "reps": reps, "conc": conc, "conc_reps": conc_reps,
           "spec_cfg": spec_cfg, "spec_models": list(spec_cfg), "peers": peers,
           "startup": {}, "errors": {}, "a": {}, "b": {}, "c": {}}
    res["peer_label"] = f"{PEER} ({', '.join(peers)})" if peers else f"no {PEER}"

    with tempfile.TemporaryDirectory(prefix="mlxd-spec-bench-") as tmp:
        tmp = Path(tmp)
        daemon = mlxd(tmp, {}, models=models)
        servers = {"mlxd": daemon}
        variants = [Variant(OFF, daemon, OFF)] + [Variant(m, daemon, m) for m in spec_cfg]
        mlxd_models = [v.model for v in variants]
        peer_variants = []
        if "plain" in peers:
            servers[PEER] = mlx_lm_server(tmp, mdir, preload=True)
            peer_variants.append(Variant(PEER + " plain", servers[PEER], servers[PEER].model))
        if drafted := [int(p.split(":")[1]) for p in peers if p.startswith("draft:")]:
            s = mlx_lm_server(tmp, mdir, preload=True, name=PEER + "-draft")
            s.cmd += ["--draft-model", str(mdir), "--num-draft-tokens", str(drafted[0])]
            servers[s.name] = s
            peer_variants += [Variant(f"{PEER} self-draft {n}", s, s.model, {"num_draft_tokens": n}) for n in drafted]
        if len(peer_variants) == 1:
            peer_variants[0].name = PEER
        res["peer_names"] = [v.name for v in peer_variants]
        try:
            for name, s in servers.items():
                res["startup"][name] = s.start(timeout=300)
            for v in variants + peer_variants:
                v.find_pid()
                stream(v.server, v.model, [{"role": "user", "content": "Hi"}], 4, v.extra)    # warm-up

            def rounds(key, n, vs, fn):
                for rep in range(n):
                    res["gates"].append(wait_quiet())
                    for v in vs[rep % len(vs):] + vs[:rep % len(vs)]:         # rotate who goes first
                        if v.name in res["errors"]:
                            continue
                        for m in mlxd_models:
                            settle([daemon], model=m)
                        try:
                            r = fn(v, rep)
                        except Exception as e:
                            res["errors"][v.name] = f"{key} rep {rep + 1}: {type(e).__name__}: {e}"[:2000]
                            print(f"  {v.name} FAILED: {res['errors'][v.name][:300]}", flush=True)
                            continue
                        res[key].setdefault(v.name, []).append(r)
                        cp = r.get("copy") if isinstance(r.get("copy"), dict) else None
                        tps = r.get("decode_tps") or r.get("agg_decode_tps")
                        n = r.get("completion_tokens") or r.get("tokens")
                        print(f"  ({key}) rep {rep + 1} {v.name}: {fmt(tps, 1)} tok/s, {n} tokens, drafted "
                              f"{r.get('drafted')} accepted {r.get('accepted')}"
                              + (f", {cp['lines_matching']}/{cp['lines_expected']} lines" if cp else ""), flush=True)

            tasks = args.tasks.split(",")
            if "a" in tasks:
                rounds("a", reps, variants + peer_variants, lambda v, rep: one(v, edit_messages(rep), max_tokens, rep))
            if "b" in tasks:
                rounds("b", reps, variants, lambda v, rep: one(v, prose_messages(rep), prose_tokens, None))
            if "c" in tasks:
                rounds("c", conc_reps, variants, lambda v, rep: concurrent(v, conc, rep, max_tokens))
        finally:
            for s in servers.values():
                s.stop()
        res["logs"] = {p.name: log_digest(p) for p in tmp.glob("*.log")}
    res["edits"] = len(EDITS)
    publish("speculative", res, report, t_start, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
