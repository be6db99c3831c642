"""Each pipeline rank's memory against the single process, for the README's "One model, several Macs".

For each model, one process loads the whole model and a 2-rank loopback group (ring backend
on 127.0.0.1) loads one stage per rank with `load_stage`, both through tests/pipeline_rank.py:
load, prefill a 1,024-token prompt the way mlx-lm does (chunks of 512 that only fill the KV
cache, then the last token's logits), decode 4 tokens. Each process reports
`mx.get_active_memory()` after the load and after the prefill, and `mx.get_peak_memory()`.
The greedy tokens of the group must equal the single process's.
Run: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python ops/bench/pipeline_memory.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mlx_lm.utils import load_tokenizer  # noqa: E402

from daemon.models.sources import resolve_model  # noqa: E402
from pipeline_rank import run_group, run_single  # noqa: E402

MODELS = ["embedded:smollm2", "embedded:gemma3-270m"]
PROMPT_TOKENS = 1024
TEXT = ("The pipeline splits a model's layers between machines: the first rank embeds the prompt and runs "
        "the first layers, sends its hidden state on, and the last rank's output is shared by all. ")
MB = 1e6


def main() -> None:
    rows = []
    for source in MODELS:
        path = resolve_model(source, dtype="float32", cache_dir=ROOT / ".cache" / "test").path
        ids = load_tokenizer(path).encode(TEXT * 100)[:PROMPT_TOKENS]
        spec = {"path": str(path), "prompt": ids, "max_tokens": 4}
        with tempfile.TemporaryDirectory() as tmp:
            single = run_single(spec, Path(tmp) / "single")
            ranks = run_group(spec, Path(tmp) / "group")
        assert all(r["tokens"] == single["tokens"] for r in ranks), (single["tokens"], [r["tokens"] for r in ranks])
        for r in [single, *ranks]:
            rows.append({"model": source, "process": "single" if r is single else f"rank {r['rank']}",
                         "stage": r["stage"], "loaded_mb": round(r["loaded"] / MB),
                         "prefilled_mb": round(r["prefilled"] / MB), "peak_mb": round(r["peak"] / MB)})
    out = ROOT / "ops" / "bench" / "results" / "pipeline_memory.json"
    out.write_text(json.dumps({"prompt_tokens": PROMPT_TOKENS, "rows": rows}, indent=1) + "\n")
    print("| model | process | layers | after load | after 1K prefill | peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['process']} | {r['stage']} | {r['loaded_mb']} MB | {r['prefilled_mb']} MB "
              f"| {r['peak_mb']} MB |")


if __name__ == "__main__":
    main()
