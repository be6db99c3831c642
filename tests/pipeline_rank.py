"""One rank of a loopback pipeline group, for the tests (and the README's memory numbers).

Run as `python tests/pipeline_rank.py SPEC_JSON` with MLX_RANK and MLX_HOSTFILE set (what
`mlx.launch` sets); `run_group` below starts the ranks. The rank loads its stage, prefills
the prompt, decodes greedily, and writes its report as JSON to `out/rank<R>.json`:
stage, tokens, active memory after load and after the prefill. With `cache_dir`, it
also stores the prompt's KV (its own layers) in a per-stage prefix cache there.
With `single: true` and no group it runs the whole model the same way (the reference).
The prompt is `prompt` (token ids) or `text` (tokenized).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFILL_STEP = 512


def main(spec: dict) -> None:
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.models.pipeline import load_stage, stage

    if spec.get("single"):
        from mlx_lm import load
        model, tokenizer = load(spec["path"])
        rank = 0
    else:
        group = mx.distributed.init(backend="ring", strict=True)
        model, tokenizer = load_stage(spec["path"], group, split=spec.get("split"))
        rank = group.rank()
    report = {"rank": rank, "stage": stage(model).tag, "loaded": mx.get_active_memory()}
    cache = make_prompt_cache(model)
    prompt = spec.get("prompt") or tokenizer.encode(spec["text"])
    # As mlx-lm prefills: chunks that only fill the cache, then the last `tail` tokens for logits.
    head = len(prompt) - spec.get("tail", 1)
    for i in range(0, head, PREFILL_STEP):
        model(mx.array([prompt[i:min(i + PREFILL_STEP, head)]]), cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(mx.array([prompt[head:]]), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    report["prompt_tokens"] = len(prompt)
    # The tail's logits: with random weights the argmax alone barely depends on attention.
    top = mx.argsort(-logits[0], axis=-1)[:, :8]
    report["top"] = [top.tolist(), mx.take_along_axis(logits[0], top, axis=-1).tolist()]
    report["prefilled"] = mx.get_active_memory()
    report["peak"] = mx.get_peak_memory()
    if spec.get("cache_dir"):
        from daemon.worker.cache.prefix import PrefixCache
        pc = PrefixCache(model, fingerprint="e" * 64, root=Path(spec["cache_dir"]), memory_budget=1 << 30,
                         disk_budget=1 << 30, stage=None if spec.get("single") else stage(model))
        report["key"] = pc.store(prompt, cache)
        pc.close()          # written before the decode below moves the cache on
    tokens = []
    y = logits[0, -1].argmax()
    for _ in range(spec.get("max_tokens", 8)):
        tokens.append(y.item())
        logits = model(y.reshape(1, 1), cache=cache)
        y = logits[0, -1].argmax()
    report["tokens"] = tokens
    if not spec.get("single"):
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))   # leave together
    out = Path(spec["out"]) / f"rank{rank}.json"
    out.write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(spec: dict, out: Path, size: int = 2, timeout: float = 600) -> list[dict]:
    """Start `size` ranks on 127.0.0.1 (ring backend), wait, and return their reports by rank."""
    out.mkdir(parents=True, exist_ok=True)
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{_free_port()}"] for _ in range(size)]))
    spec = {**spec, "out": str(out)}
    procs = []
    for rank in range(size):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        log = open(out / f"rank{rank}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, __file__, json.dumps(spec)], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((out / f"rank{r}.log").read_text(errors="replace")[-3000:] for r in range(size))
    assert all(p.returncode == 0 for p in procs), logs
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]


def run_single(spec: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out), "single": True}
    subprocess.run([sys.executable, __file__, json.dumps(spec)], cwd=ROOT, check=True, timeout=600)
    return json.loads((out / "rank0.json").read_text())


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
