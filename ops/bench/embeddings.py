"""Embeddings throughput: mlxd (batched, and one input per request) vs sentence-transformers.

Inputs/s for 1, 16 and 256 inputs of 16-256 tokens (lengths drawn uniformly, seeded), on
all-MiniLM-L6-v2 from the same unzipped directory: mlxd's worker (our MLX BERT, OpenBLAS)
through POST /v1/embeddings, one request with every input, then the same inputs one per
request (sequential, and from 16 client threads, which the engine batches across requests),
against sentence-transformers on torch CPU `model.encode(inputs)` (batch_size 32, its
default) in its own venv (ops/bench/setup_peers.sh sentence-transformers). Contenders take
turns per repetition, so load from other processes on this shared box falls on all alike.
Besides wall-clock inputs/s it records inputs per CPU-second (mlxd: daemon + worker; the
reference: its process), the fairer figure while other processes share the two cores.
The run also checks that both produce the same vectors (min cosine).
Run: .venv/bin/python ops/bench/embeddings.py [--quick] [--counts 1,16,256] [--per-request-max 16]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_seconds, env_with, load_now, median, mlxd, publish, wait_quiet  # noqa: E402

ST_PYTHON = ROOT / ".venv-bench" / "sentence-transformers" / "bin" / "python"
COUNTS = (1, 16, 256)
REPS = {1: 3, 16: 2, 256: 1}
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact model memory cache engine batch token vector search "
         "question answer river mountain city music paper light water energy system network daemon worker").split()


def make_inputs(tok, n: int, seed: int, lo: int = 16, hi: int = 256) -> list[str]:
    """n texts whose tokenized length (special tokens included) is uniform in [lo, hi]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        words = []
        while len(tok.encode(" ".join(words)).ids) < target:
            words += rng.choices(WORDS, k=max(1, (target - len(tok.encode(" ".join(words)).ids)) // 2 or 1))
        while len(tok.encode(" ".join(words)).ids) > target:
            words.pop()
        out.append(" ".join(words))
    return out


class SentenceTransformers:
    """The reference in its own venv: one JSON line in (texts), one out (seconds, vectors)."""

    CHILD = r'''
import base64, json, sys, time
import numpy as np, torch
from sentence_transformers import SentenceTransformer
m = SentenceTransformer(sys.argv[1], device="cpu")
print("@@" + json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    texts = json.loads(line)
    t = time.perf_counter()
    v = m.encode(texts, batch_size=32, convert_to_numpy=True)
    dt = time.perf_counter() - t
    print("@@" + json.dumps({"seconds": dt, "vectors": base64.b64encode(v.astype("<f4").tobytes()).decode()}), flush=True)
'''

    def __init__(self, model_path: Path, logdir: Path):
        self.log = open(logdir / "sentence-transformers.log", "ab")
        env = {k: v for k, v in env_with(False).items() if k != "LD_PRELOAD"}
        self.proc = subprocess.Popen([str(ST_PYTHON), "-c", self.CHILD, str(model_path)], env=env, cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError("sentence-transformers ended; see its log")

    def encode(self, texts: list[str]) -> tuple[float, np.ndarray]:
        self.proc.stdin.write(json.dumps(texts) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["seconds"], np.frombuffer(base64.b64decode(r["vectors"]), "<f4").reshape(len(texts), -1)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def post(client: httpx.Client, url: str, texts: list[str]) -> np.ndarray:
    r = client.post(url, json={"model": "minilm", "input": texts, "encoding_format": "base64"}, timeout=900)
    r.raise_for_status()
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])


def timed(fn, pids: list[int]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of `pids` while fn runs."""
    c = sum(cpu_seconds(p) for p in pids)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, sum(cpu_seconds(p) for p in pids) - c


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run with small counts (its numbers mean nothing)")
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)), help="inputs per run, comma-separated")
    ap.add_argument("--per-request-max", type=int, default=256, help="one-input-per-request runs only up to this count")
    args = ap.parse_args()
    counts = (1, 4) if args.quick else tuple(int(c) for c in args.counts.split(","))
    reps = {1: 1, 4: 1} if args.quick else {n: REPS.get(n, 1) for n in counts}
    if not ST_PYTHON.exists():
        print(f"no {ST_PYTHON}: run ops/bench/setup_peers.sh sentence-transformers", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    res = {"load_start": load_now(), "counts": list(counts), "reps": {str(k): v for k, v in reps.items()}, "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-embed-"))
    srv = mlxd(work, {}, models=[{"name": "minilm", "source": "embedded:all-minilm-l6-v2"}])
    res["mlxd_start_s"] = round(srv.start(), 2)
    try:
        status = httpx.get(srv.url + "/v1/status", timeout=10).json()["models"][0]
        path = Path(status["worker"]["path"])
        res["worker"] = {k: status["worker"].get(k) for k in ("device", "blas", "dtype")}
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        st = SentenceTransformers(path, work)
        res["sentence_transformers"] = st.info
        url = srv.url + "/v1/embeddings"
        mlxd_pids = [srv.proc.pid, status["pid"]]
        with httpx.Client() as client, ThreadPoolExecutor(16) as pool:
            warm = make_inputs(tok, 16, seed=99)
            post(client, url, warm)
            st.encode(warm)
            for n in counts:
                texts = make_inputs(tok, n, seed=n)
                tokens = sum(len(tok.encode(t).ids) for t in texts)
                runs = {"batched": [], "per_request": [], "per_request_16_threads": [], "sentence_transformers": []}
                cpu = {k: [] for k in runs}
                check = None
                for _ in range(reps[n]):
                    res.setdefault("gates", []).append(wait_quiet(0 if args.quick else 30))
                    got = {}

                    def add(kind, wall_cpu):
                        runs[kind].append(wall_cpu[0])
                        cpu[kind].append(wall_cpu[1])
                    add("batched", timed(lambda: got.setdefault("v", post(client, url, texts)), mlxd_pids))
                    if n <= args.per_request_max:
                        add("per_request", timed(lambda: [post(client, url, [t]) for t in texts], mlxd_pids))
                        if n > 1:
                            add("per_request_16_threads", timed(lambda: list(pool.map(
                                lambda t: post(httpx, url, [t]), texts)), mlxd_pids))
                    c0 = cpu_seconds(st.proc.pid)
                    seconds, ref = st.encode(texts)
                    runs["sentence_transformers"].append(seconds)
                    cpu["sentence_transformers"].append(cpu_seconds(st.proc.pid) - c0)
                    cos = (got["v"] * ref).sum(1) / np.linalg.norm(got["v"], axis=1) / np.linalg.norm(ref, axis=1)
                    check = float(cos.min()) if check is None else min(check, float(cos.min()))
                res["runs"][str(n)] = {
                    "tokens": tokens, "min_cosine_vs_sentence_transformers": check,
                    "seconds": runs, "cpu_seconds": cpu,
                    "inputs_per_s": {k: (round(n / median(v), 2) if v else None) for k, v in runs.items()},
                    "inputs_per_cpu_s": {k: (round(n / median(v), 2) if v else None) for k, v in cpu.items()},
                }
                print(json.dumps({n: res["runs"][str(n)]["inputs_per_s"], "cpu": res["runs"][str(n)]["inputs_per_cpu_s"],
                                  "min_cos": check}), flush=True)
        st.close()
    finally:
        srv.stop()
    publish("embeddings", res, report, t_start, args.quick)
    return 0


def report(res: dict, command: str) -> str:
    st = res.get("sentence_transformers", {})
    lines = [
        "# Embeddings: mlxd vs sentence-transformers (all-MiniLM-L6-v2, CPU)",
        "",
        f"Inputs/s (median of {', '.join(f'{v} for {k}' for k, v in res['reps'].items())} runs), inputs of 16-256 "
        f"tokens. mlxd: {res['worker'].get('device')}, BLAS {res['worker'].get('blas')}, {res['worker'].get('dtype')}; "
        f"sentence-transformers on torch {st.get('torch')} CPU ({st.get('threads')} threads), `encode(batch_size=32)` "
        "in-process (no HTTP). Load average at start / end: "
        f"{res['load_start']} / {res.get('load_end')}.",
        "",
        "Each cell: inputs/s wall clock, then inputs per CPU-second in brackets.",
        "",
        "| inputs | tokens | mlxd, one request | mlxd, one input per request | same, 16 client threads | sentence-transformers | 1 - min cosine vs ST |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, r in res["runs"].items():
        ips, ipc = r["inputs_per_s"], r["inputs_per_cpu_s"]
        cell = lambda k: f"{ips[k]:.2f} ({ipc[k]:.2f})" if ips.get(k) else "-"  # noqa: E731
        lines.append(f"| {n} | {r['tokens']} | {cell('batched')} | {cell('per_request')} | "
                     f"{cell('per_request_16_threads')} | {cell('sentence_transformers')} | "
                     f"{1 - r['min_cosine_vs_sentence_transformers']:.1e} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
