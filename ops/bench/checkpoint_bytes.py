"""What one checkpoint costs in the block memory tier, against a whole snapshot (issue 21, item 2).

For each architecture of tests/tiny_models.py (random weights in each family's real mix of
layers: plain KV, sliding windows, gated delta-net, short convolutions), a conversation's
entry at `--tokens` is stored in a `BlockPool`, then checkpoints of the same conversation at
fractions of it. A checkpoint shares its attention KV with the entry's blocks and keeps only
its tail and its rotating/recurrent layers; the table gives those own bytes against what the
same checkpoint would take as a whole snapshot (`logical_bytes`). In-process, no daemon: the
numbers are byte counts, not timings, so the machine's load does not change them.

    .venv/bin/python ops/bench/checkpoint_bytes.py [--tokens 2048] [--block-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

OUT = ROOT / "ops" / "bench" / "results"


def prefill(model, tokens: list[int]) -> list:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for i in range(0, len(tokens), 512):
        model(mx.array([tokens[i:i + 512]]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def measure(arch: str, n_tokens: int, block_tokens: int) -> dict:
    import numpy as np
    from mlx_lm import load

    from daemon.worker.cache.index import block_hashes
    from daemon.worker.cache.memory import BlockPool
    from tiny_models import VOCAB, tiny_model

    model, _ = load(str(tiny_model(arch)))
    tokens = np.random.default_rng(0).integers(3, VOCAB, n_tokens).tolist()
    hashes = block_hashes(tokens)
    pool = BlockPool(block_tokens)
    entry = pool.split(prefill(model, tokens), n_tokens, hashes)
    rows = []
    for frac in (0.25, 0.5, 0.75):
        n = (int(n_tokens * frac) // 32) * 32 + 17      # off a block boundary: a real tail
        ck = pool.split(prefill(model, tokens[:n]), n, hashes)
        rows.append({"at": n, "own_bytes": ck.own_bytes, "snapshot_bytes": pool.logical_bytes(ck)})
    kinds = sorted({type(c).__name__ for c in prefill(model, tokens[:32])})
    return {"arch": arch, "layers": kinds, "entry_tokens": n_tokens, "entry_bytes": pool.logical_bytes(entry),
            "unique_bytes": pool.nbytes + entry.own_bytes + sum(r["own_bytes"] for r in rows),
            "checkpoints": rows}


def markdown(results: list[dict], args) -> str:
    lines = [f"# One checkpoint's bytes in the block memory tier ({args.tokens}-token entry, "
             f"block_tokens {args.block_tokens})", "",
             "`.venv/bin/python ops/bench/checkpoint_bytes.py` — tiny random-weight models of "
             "tests/tiny_models.py in each family's real layer mix; byte counts, not timings. "
             "Own bytes = the checkpoint's 17-token tail of plain KV plus its whole rotating / recurrent "
             "layers; the attention KV before the tail is the entry's shared blocks. The tiny models' "
             "windows are 64 tokens: a real model's own bytes grow with its window and state, its "
             "snapshot with the context.", "",
             "| arch | layer caches | checkpoint at | own bytes | as a whole snapshot | own / snapshot |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for c in r["checkpoints"]:
            lines.append(f"| {r['arch']} | {', '.join(r['layers'])} | {c['at']} | {c['own_bytes']:,} | "
                         f"{c['snapshot_bytes']:,} | {c['own_bytes'] / c['snapshot_bytes']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from tiny_models import ARCHS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--block-tokens", type=int, default=256)
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    args = ap.parse_args()
    results = [measure(a, args.tokens, args.block_tokens) for a in args.archs]
    md = markdown(results, args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "checkpoint_bytes.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUT / "checkpoint_bytes.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
