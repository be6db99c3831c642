"""The coding-agent session on a hybrid recurrent model: per step, prompt, cached tokens, TTFT / floor.

agent.py's session (agent_session.py: a ~1.6K-token system prompt, 10 tools, 10 tool steps) on
the tiny random-weight qwen3_5 of tests/tiny_models.py (three gated delta-net layers to one
attention layer: its cache cannot be trimmed), under Qwen3's thinking template (tools rendered
by the template, the generation prompt opening a reasoning block). Every server serves one
copy of that directory with the thinking template as its own, so they render alike. Each
request is streamed with `tools` and `tool_choice: "auto"`, max_tokens 16, greedy.

The floor of a request is raw mlx-lm (OpenBLAS preloaded, in a child process) prefilling the
tokens this prompt does not share with the previous one onto a copy of a cache holding the
shared part (built untimed), in mlxd's chunks, plus the first token: what a perfect cache would leave to do.
Peers (mlx_lm.server, vllm-mlx) run only where their venvs exist (common.PEER_BIN).

Run: .venv/bin/python ops/bench/agent_hybrid.py   (a few minutes; --quick: 4 steps, 1 floor run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from agent_session import TOOLS, session  # noqa: E402
from floor import PREFILL_STEP, serve as serve_floor  # noqa: E402
from common import (PEER_BIN, InProc, load_now, mlx_lm_server, mlxd, publish,  # noqa: E402
                    stream_chat, vllm_mlx_server, wait_quiet)

STEP_TOKENS = 16

FLOOR_REPS = 3
TARGET = 1.2
AGENT = {"tools": TOOLS, "tool_choice": "auto"}


def model_copy(workdir: Path) -> Path:
    """The tiny qwen3_5 with the thinking template as the directory's own (every server reads it)."""
    from tiny_models import THINKING_TEMPLATE, tiny_model

    out = workdir / "qwen3_5-thinking"
    shutil.copytree(tiny_model("qwen3_5"), out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = THINKING_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def floor_worker(payload: dict) -> None:
    """Per request {tokens, reuse, reps}: the floor (floor.py) of tokens[reuse:] onto a cache
    holding tokens[:reuse] (recurrent state cannot be trimmed back: floor.py times copies)."""
    serve_floor(payload)


def shared(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def run(quick: bool) -> dict:
    from chat_reuse import Renderer

    t_start = time.perf_counter()
    res = {"load_start": load_now(), "servers": [], "steps": {}, "floor": [], "peers_missing": []}
    with tempfile.TemporaryDirectory(prefix="agent-hybrid-") as tmp:
        workdir = Path(tmp)
        mdir = model_copy(workdir)
        renderer = Renderer(mdir)
        requests = session(lambda text: len(renderer.tok.encode(text, add_special_tokens=False)),
                           n_steps=3 if quick else 10)
        prompts = [renderer.tokens(m, TOOLS) for m in requests]
        res["prompt_tokens"] = [len(p) for p in prompts]

        floor = InProc("--floor", {"model_dir": str(mdir)}, workdir)
        try:
            for i, p in enumerate(prompts):
                reuse = shared(prompts[i - 1], p) if i else 0
                r = floor.call({"tokens": p, "reuse": reuse, "reps": 1 if quick else FLOOR_REPS})
                res["floor"].append({"reuse": reuse, "new": len(p) - reuse, **r})
        finally:
            floor.close()

        servers = [mlxd(workdir, {}, models=[{
            "name": "qwen3_5", "source": str(mdir), "dtype": "float32",
            "engine": {"max_batch_size": 8, "prefill_step_size": PREFILL_STEP, "context_length": 32768}}])]
        for name, make in (("mlx-lm", lambda: mlx_lm_server(workdir, mdir, True)),
                           ("vllm-mlx", lambda: vllm_mlx_server(workdir, mdir))):
            if PEER_BIN[name].exists():
                servers.append(make())
            else:
                res["peers_missing"].append(f"{name} (no {PEER_BIN[name]})")
        for server in servers:
            res["servers"].append(server.name)
            steps = res["steps"][server.name] = []
            with server:
                server.start()
                for msgs in requests:
                    wait_quiet(30)
                    r = stream_chat(server, msgs, STEP_TOKENS, timeout=300, extra=AGENT)
                    steps.append({k: r[k] for k in ("ttft", "prompt_tokens", "cached_tokens", "first_kind")})
    res["seconds"] = time.perf_counter() - t_start
    return res


def report(res: dict, cmd: str) -> str:
    n = len(res["prompt_tokens"])
    L = ["# Agent session on a hybrid recurrent model (tiny qwen3_5, Qwen3 thinking template)", "",
         f"Command: `{cmd}`", "",
         f"Load average {res['load_start']} at start, {res['load_end']} at end; {res['seconds'] / 60:.1f} min. "
         "Random weights (tests/tiny_models.py): only the cache's work is measured. "
         + (f"Not run: {', '.join(res['peers_missing'])}." if res["peers_missing"] else ""), ""]
    head = ["step", "prompt", "shared w/ previous", "floor (s)"]
    for name in res["servers"]:
        head += [f"{name} cached", f"{name} TTFT (s)", "/ floor"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    worst = {name: 0.0 for name in res["servers"]}
    for i in range(n):
        fl = res["floor"][i]
        row = [str(i + 1), str(res["prompt_tokens"][i]), str(fl["reuse"]), f"{fl['ttft']:.3f}"]
        for name in res["servers"]:
            s = res["steps"][name][i]
            ratio = s["ttft"] / fl["ttft"] if s["ttft"] and fl["ttft"] else None
            if ratio is not None and i:
                worst[name] = max(worst[name], ratio)
            row += [f"{s['cached_tokens']} of {s['prompt_tokens']}", f"{s['ttft']:.3f}",
                    f"{ratio:.2f}x" if ratio is not None else "n/a"]
        L.append("| " + " | ".join(row) + " |")
    L += ["", f"Worst TTFT / floor over steps 2-{n} (target <= {TARGET}x): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in worst.items()) + "."]
    return "\n".join(L) + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--floor":
        floor_worker(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 requests, one floor run each")
    quick = ap.parse_args().quick
    t0 = time.perf_counter()
    res = run(quick)
    publish("agent_hybrid", res, report, t0, quick)


if __name__ == "__main__":
    main()
