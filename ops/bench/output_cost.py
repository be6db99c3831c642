"""CPU cost per generated token of turning tokens into events (daemon/worker/output.py).

Detokenization alone (`TextStream`, what every request paid before) against a chat request's
`Output` with reasoning and tool markers, on plain text, on a Hermes `write` call carrying a
whole file (arguments streamed as written) and on qwen3_coder calls. Best of 3 runs each.
Run: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python ops/bench/output_cost.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mlx_lm.tokenizer_utils import load  # noqa: E402

from daemon.models import resolve_model  # noqa: E402
from daemon.worker import tools  # noqa: E402
from daemon.worker.output import THINK, Markers, Output, state_machine  # noqa: E402
from daemon.worker.textstream import TextStream  # noqa: E402


def per_token(make, tokens) -> float:
    best = float("inf")
    for _ in range(3):
        out, t = make(), time.perf_counter()
        for tok in tokens:
            out.add(tok)
        best = min(best, time.perf_counter() - t)
    return best / len(tokens) * 1e6


def main() -> None:
    path = resolve_model("embedded:smollm2", dtype="float32", cache_dir=ROOT / ".cache" / "test").path
    tok = load(path)
    qtok = load(path, tokenizer_config_extra={"tool_parser_type": "qwen3_coder"})
    code = (ROOT / "daemon" / "worker" / "engine.py").read_text()
    call = json.dumps({"name": "write", "arguments": {"path": "engine.py", "content": code}})
    schema = [{"type": "function", "function": {"name": "write", "parameters": {"type": "object", "properties": {
        "content": {"type": "string"}, "lines": {"type": "array"}}}}}]
    machine = state_machine(tok, Markers(THINK, ("<tool_call>", "</tool_call>")))

    def enc(t, text):
        return t.encode(text, add_special_tokens=False)

    def qwen(param, value):
        return enc(qtok, f"<tool_call>\n<function=write>\n<parameter={param}>\n{value}\n</parameter>\n</function>\n</tool_call>")

    rows = [
        ("detokenize only (TextStream)", lambda: TextStream(tok.detokenizer, []), enc(tok, code)),
        ("Output, plain text", lambda: Output("r", tok.detokenizer, [], machine, "normal", tools.JsonCall), enc(tok, code)),
        ("Output, Hermes write call of a file", lambda: Output("r", tok.detokenizer, [], machine, "normal", tools.JsonCall),
         enc(tok, f"<tool_call>\n{call}\n</tool_call>")),
        ("Output, qwen3_coder string parameter", lambda: Output("r", qtok.detokenizer, [], machine, "normal",
                                                               tools.Qwen3CoderCall, qtok.tool_parser, schema),
         qwen("content", code)),
        ("Output, qwen3_coder array parameter", lambda: Output("r", qtok.detokenizer, [], machine, "normal",
                                                              tools.Qwen3CoderCall, qtok.tool_parser, schema),
         qwen("lines", json.dumps(code.splitlines()))),
    ]
    for name, make, tokens in rows:
        print(f"{name:40s} {per_token(make, tokens):6.1f} µs/token  ({len(tokens)} tokens)")


if __name__ == "__main__":
    main()
