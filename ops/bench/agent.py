"""Coding-agent benchmark: a scripted opencode-shaped session on mlxd, mlx_lm.server and vllm-mlx.

(a) One agent session (agent_session.py: a ~1.6K-token system prompt, 10 tools, then 10 tool
    steps whose calls are fixed and whose results are real file contents and command outputs),
    sent as opencode sends it: streamed, `stream_options.include_usage`, `tools`,
    `tool_choice: "auto"`, assistant turns with `content: ""` + `tool_calls`, `tool` messages.
    11 requests (the opening one, then one after each tool result), each the previous one plus
    a call and its result, with max_tokens 16: TTFT and cached tokens per request. Each server
    renders its own prompt (SmolLM2's template has no tools: a server that does not render them
    itself drops them), so each gets its own floor: raw mlx-lm prefilling as many tokens as that
    server's prompt grew by onto a KV cache as long as its previous prompt, plus the first token
    (floor.py; token counts follow the server, the tokens are the session rendered with its tools).
(b) A new session: same system prompt and tools, another first user message: cached tokens
    and TTFT against the first session's cold opening request.
(c) Tool calls: one streamed request per server with `tool_choice: "auto"` and one with
    `"required"`; whether the stream carried `delta.tool_calls` that the openai SDK reassembles
    into a call to a listed tool with JSON arguments valid for its schema.
(d) On mlxd: decode speed of a `response_format: json_schema` request vs the same request
    unconstrained (noted, not measured, where the server rejects or ignores it).

Servers take each request round-robin (one computing at a time), OpenBLAS preloaded, same
f32 model directory. Run: .venv/bin/python ops/bench/agent.py   (about 20-25 minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from agent_session import TOOLS, USER_2, fallback_render, session  # noqa: E402
from common import (InProc, load_now, median, mlx_lm_server, mlxd, model_dir, publish,  # noqa: E402
                    save_ttft_plot, stream_chat, ttft_axes, vllm_mlx_server, wait_quiet)
from floor import PREFILL_STEP, serve as serve_floor  # noqa: E402
from prefix import MLXD_CFG, cache_stats, fmt, log_digest, ratio, settle, warm_up  # noqa: E402

SERVERS = ("mlxd", "mlx_lm.server", "vllm-mlx")
# The same session through /v1/messages with the anthropic SDK, on a second mlxd with its own cache
# (one daemon for both would serve each request the other's prefix). Run with --messages.
MESSAGES = "mlxd-messages"
STEPS = 10
STEP_TOKENS = 16
PROBE_TOKENS = 160   # room for a whole call: a forced `todowrite` or `write` runs long
JSON_TOKENS = 96
FLOOR_REPS = 3
JSON_REPS = 3
REQUEST_TIMEOUT = 400
TARGET_FLOOR, TARGET_JSON = 1.2, 0.9
AGENT = {"tools": TOOLS, "tool_choice": "auto"}
PROJECT_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "summary", "files"],
    "properties": {
        "name": {"type": "string"}, "summary": {"type": "string"},
        "files": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                             "required": ["path", "purpose"],
                                             "properties": {"path": {"type": "string"},
                                                            "purpose": {"type": "string"}}}}}}
JSON_CHAT = [{"role": "system", "content": "You are a helpful assistant that answers in JSON."},
             {"role": "user", "content": "Describe textkit, a small Python library of text utilities (wrapping, "
                                         "shortening, dedenting, shell-style splitting), as a JSON object with its "
                                         "name, a one-paragraph summary and its files with their purpose."}]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "project", "schema": PROJECT_SCHEMA, "strict": True}}


def step(server, messages: list[dict]) -> dict:
    if server.name == MESSAGES:
        from messages_client import stream_messages

        r = stream_messages(server.url, server.model, messages, STEP_TOKENS, timeout=REQUEST_TIMEOUT, tools=TOOLS)
    else:
        r = stream_chat(server, messages, STEP_TOKENS, timeout=REQUEST_TIMEOUT, extra=AGENT)
    return {k: r[k] for k in ("ttft", "prompt_tokens", "cached_tokens", "completion_tokens", "total",
                              "first_kind", "tool_call_chunks", "finish_reason", "text")}


def args_check(name: str, arguments: str) -> str | None:
    """Why a reassembled call is not a valid call to one of TOOLS, or None."""
    tool = next((t["function"] for t in TOOLS if t["function"]["name"] == name), None)
    if tool is None:
        return f"unknown tool {name!r}"
    try:
        args = json.loads(arguments or "")
    except ValueError as e:
        return f"arguments are not JSON: {e}"
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in tool["parameters"]["required"] if not isinstance(args, dict) or k not in args]
        return f"missing {missing}" if missing else None
    try:
        jsonschema.validate(args, tool["parameters"])
    except jsonschema.ValidationError as e:
        return f"arguments do not match the schema: {e.message}"
    return None


def probe(server, messages: list[dict], choice: str) -> dict:
    """One streamed request with `tool_choice`, reassembled by the openai SDK's own stream state."""
    import openai
    from openai.lib.streaming.chat import ChatCompletionStreamState

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", timeout=REQUEST_TIMEOUT, max_retries=0)
    state = ChatCompletionStreamState(input_tools=TOOLS)
    out = {"choice": choice, "tool_call_chunks": 0, "argument_deltas": 0, "error": None, "status": 200}
    t0 = time.perf_counter()
    try:
        for chunk in client.chat.completions.create(
                model=server.model, messages=messages, tools=TOOLS, tool_choice=choice, max_tokens=PROBE_TOKENS,
                temperature=0.0, stream=True, stream_options={"include_usage": True}):
            state.handle_chunk(chunk)
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    out["tool_call_chunks"] += 1
                    out.setdefault("first_tool_call_s", time.perf_counter() - t0)
                    out["argument_deltas"] += bool(tc.function and tc.function.arguments)
    except openai.APIError as e:
        out["status"] = getattr(e, "status_code", None)
        out["error"] = f"{type(e).__name__}: {e.message}"[:400]
        return out
    snap = state.current_completion_snapshot
    msg = snap.choices[0].message
    out["calls"] = [{"name": tc.function.name, "arguments": tc.function.arguments,
                     "problem": args_check(tc.function.name, tc.function.arguments)}
                    for tc in msg.tool_calls or []]
    out["parseable"] = bool(out["calls"]) and all(c["problem"] is None for c in out["calls"])
    out["content"] = (msg.content or "")[:300]
    out["finish_reason"] = snap.choices[0].finish_reason
    return out


def constrained(server) -> dict:
    """Decode speed with and without `response_format` (alternating, greedy, same prompt)."""
    out = {"plain": [], "json": [], "error": None}
    for _ in range(JSON_REPS):
        for kind, extra in (("plain", None), ("json", {"response_format": RESPONSE_FORMAT})):
            try:
                r = stream_chat(server, JSON_CHAT, JSON_TOKENS, timeout=REQUEST_TIMEOUT, extra=extra)
            except Exception as e:
                out["error"] = f"{kind}: {type(e).__name__}: {e}"[:500]
                return out
            r["valid"] = schema_valid(r["text"])
            out[kind].append({k: r[k] for k in ("decode_tps", "completion_tokens", "finish_reason", "text", "valid")})
    return out


def schema_valid(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return isinstance(obj, dict) and all(k in obj for k in PROJECT_SCHEMA["required"])
    return jsonschema.Draft202012Validator(PROJECT_SCHEMA).is_valid(obj)


# -- the floor (re-executed with OpenBLAS preloaded) ------------------------------------------

def floor_worker(payload: dict) -> None:
    """Per request {series, reuse, new}: the floor (floor.py) of `new` tokens of the session's
    token stream onto that series' cache holding its first `reuse` tokens."""
    stream = payload["tokens"]
    serve_floor(payload, lambda f, req: (stream[:req["reuse"] + req["new"]], req["reuse"]))


def floor_tokens(tokenizer, messages: list[dict], length: int) -> list[int]:
    """The token stream the floor prefills: the session rendered with its tools and calls
    (fallback_render), repeated past `length` (only token counts follow the servers)."""
    ids = template_ids(tokenizer, fallback_render(messages))
    return (ids * (length // len(ids) + 1))[:length]


def template_ids(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- report ---------------------------------------------------------------------------------

def tok(n) -> str:
    return "-" if n is None else str(n)


def floor_ratios(res: dict, name: str) -> list:
    fl, steps = res["floor"].get(name, []), res["a"][name]
    return [ratio(steps[i].get("ttft"), fl[i]["ttft"] if fl[i] else None) for i in range(min(len(fl), len(steps)))]


def choice_outcome(p: dict) -> str:
    if p.get("error"):
        return f"rejected ({p['status']})" if 400 <= (p.get("status") or 0) < 500 else "error"
    if p["parseable"]:
        return f"{len(p['calls'])} parseable call{'s' * (len(p['calls']) > 1)}"
    if p["calls"]:
        return "unparseable call"
    return "ignored (no call)" if p["choice"] == "required" else "no call"


def summary(res: dict) -> list[str]:
    names, a, b = res["servers"], res["a"], res["b"]
    head = "| | target | " + " | ".join(names) + " |"
    L = ["## Summary", "", head, "|" + "---|" * (len(names) + 2)]
    bare, tools = res["session"]["opening_without_tools"], res["session"]["tools_tokens"]
    L.append(f"| the tools reach the model (opening prompt vs {bare} tokens without tools) | yes | " + " | ".join(
        "n/a" if not (p := a[name][0].get("prompt_tokens")) else
        (f"yes ({p} tokens)" if p - bare > tools / 2 else f"no ({p} tokens)") for name in names) + " |")
    row = []
    for name in names:
        rs = [r for r in floor_ratios(res, name)[1:] if r is not None]
        row.append(f"median {fmt(median(rs))}x, max {fmt(max(rs))}x" if rs else "n/a")
    L.append(f"| requests 2-{len(res['requests'])}: TTFT / floor on its own prompts | <= {TARGET_FLOOR}x | "
             + " | ".join(row) + " |")
    row = []
    for name in names:
        new, cold = b["servers"].get(name) or {}, a[name][0]
        row.append(f"{tok(new.get('cached_tokens'))} of {new.get('prompt_tokens')} cached; "
                   f"TTFT {fmt(new.get('ttft'))} s vs {fmt(cold.get('ttft'))} s cold")
    L.append("| new session (same system prompt + tools): opening request | reuses the shared prefix | "
             + " | ".join(row) + " |")
    L.append("| streamed tool calls, tool_choice auto / required | parseable; required honored | " + " | ".join(
        " / ".join(choice_outcome(p) for p in res["c"].get(name, [])) or "n/a" for name in names) + " |")
    if MESSAGES in names and "mlxd" in names:       # the same session, Messages API vs Chat Completions
        rs = [ratio(m.get("ttft"), c.get("ttft")) for m, c in zip(a[MESSAGES][1:], a["mlxd"][1:])]
        rs = [r for r in rs if r is not None]
        L.append(f"| requests 2-{len(res['requests'])}: TTFT via /v1/messages / via /v1/chat/completions | <= 1.1x | "
                 + " | ".join((f"median {fmt(median(rs))}x, max {fmt(max(rs))}x" if rs else "n/a")
                              if name == MESSAGES else "" for name in names) + " |")
    d = res.get("d")
    L.append(f"| json_schema decode / unconstrained (mlxd) | >= {TARGET_JSON}x | " + " | ".join(
        (json_verdict(d) if name == "mlxd" else "not run") for name in names) + " |")
    return L


def report(res: dict, cmd: str) -> str:
    names, a = res["servers"], res["a"]
    n = len(res["requests"])
    gates = [g["others_busy"] for g in res["gates"]] or [0]
    L = ["# Coding-agent benchmark", "", f"Command: `{cmd}`", "",
         f"Model: SmolLM2-135M-Instruct f32, OpenBLAS preloaded everywhere, greedy. Took {res['seconds'] / 60:.1f} "
         f"min. Shared machine: load average {res['load_start']} at start, {res['load_end']} at end; before "
         f"{len(res['gates'])} rounds other processes kept the CPUs {min(gates):.0%}-{max(gates):.0%} busy (median "
         f"{median(gates):.0%}; each waited up to {res['quiet_wait']:.0f} s for them to go idle).", "",
         f"Session: {res['session']['system_tokens']}-token system prompt, {len(TOOLS)} tools "
         f"({res['session']['tools_tokens']} tokens as JSON), {n - 1} tool steps; requests as opencode sends them "
         f"(streamed, include_usage, tools, tool_choice auto), max_tokens {STEP_TOKENS}.", "", *summary(res), ""]
    L += ["## (a) TTFT per request (s); (cached) = prompt tokens the server reported as reused", ""]
    head = ["req", "added"]
    for name in names:
        head += [f"{name} prompt (cached)", f"{name} TTFT", "its floor", "/ floor"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(n):
        row = [str(i + 1), res["requests"][i]["added"]]
        for name in names:
            s = a[name][i]
            row += [f"{s.get('prompt_tokens')} ({tok(s.get('cached_tokens'))})", fmt(s.get("ttft"))]
            f = res["floor"].get(name, [])
            row.append(fmt(f[i]["ttft"], 3) if i < len(f) and f[i] else "n/a")
            rs = floor_ratios(res, name)
            row.append(fmt(rs[i]) + "x" if i < len(rs) and rs[i] is not None else "n/a")
        L.append("| " + " | ".join(row) + " |")
    L += ["", *summary_lines(res), ""]
    kinds = {name: sorted({s.get("first_kind") or "none" for s in a[name]}) for name in names}
    L += ["Each server's floor prefills as many tokens as its prompt grew by onto a cache as long as its previous "
          f"prompt, in {PREFILL_STEP}-token chunks (the first request: its whole prompt, cold, once; median of "
          f"{res.get('floor_reps', FLOOR_REPS)} otherwise); servers whose prompt sizes are equal so far share one. "
          "Each server renders the prompt its own way: SmolLM2's template has no tools, so a server that does not "
          "render them itself drops them (see the summary). '-': the server reports no cached tokens. "
          "TTFT is the first chunk carrying content, reasoning "
          "or tool-call deltas; first chunk by kind: "
          + "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items()) + ".", ""]

    b = res["b"]
    L += ["## (b) A new session sharing the system prompt and tools", "",
          f"Same system prompt and tools, another first user message. Shared prefix: {b['shared_floor_tokens']} "
          f"tokens in the floor's rendering (system prompt + tools); the new request adds "
          f"{b['suffix_tokens']} of its own.", "",
          "| server | 1st session, opening request: TTFT | cached | new session: TTFT | cached | prompt |",
          "|---|---|---|---|---|---|"]
    for name in names:
        first, new = a[name][0], b["servers"].get(name) or {}
        L.append(f"| {name} | {fmt(first.get('ttft'))} | {tok(first.get('cached_tokens'))} | "
                 f"{fmt(new.get('ttft'))} | {tok(new.get('cached_tokens'))} | {new.get('prompt_tokens')} |")
    if b.get("floor") and res["floor"].get("mlxd"):
        L.append(f"| floor | {fmt(res['floor']['mlxd'][0]['ttft'], 3)} (cold) | | {fmt(b['floor']['ttft'], 3)} "
                 f"({b['floor']['new']} new on {b['floor']['reuse']}) | | |")
    L += ["", "## (c) Tool calls in the stream (max_tokens %d, the session's opening request)" % PROBE_TOKENS, "",
          "| server | tool_choice | outcome | tool-call chunks | argument deltas | calls reassembled by the SDK | "
          "finish | content (start) |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        for p in res["c"].get(name, []):
            if p.get("error"):
                L.append(f"| {name} | {p['choice']} | {choice_outcome(p)} | | | {p['error'][:200]} | | |")
                continue
            calls = "; ".join(f"{c['name']}({c['arguments'][:80]})" + (f" [{c['problem']}]" if c["problem"] else "")
                              for c in p["calls"]) or "none"
            content = p["content"][:60].replace("|", "\\|").replace("\n", " ")
            L.append(f"| {name} | {p['choice']} | {choice_outcome(p)} | {p['tool_call_chunks']} | "
                     f"{p['argument_deltas']} | {calls} | {p['finish_reason']} | {content} |")
    L += ["", "## (d) Constrained decoding on mlxd (`response_format: json_schema`)", "", *json_lines(res["d"]), ""]
    if res["errors"]:
        L += [f"Failures: {json.dumps(res['errors'])}", ""]
    return "\n".join(L)


def summary_lines(res: dict) -> list[str]:
    a = res["a"]
    if "mlxd" not in a:
        return []
    full = [a["mlxd"][i]["cached_tokens"] == a["mlxd"][i - 1]["prompt_tokens"] for i in range(1, len(a["mlxd"]))]
    L = [f"mlxd reused the whole previous prompt on {sum(full)} of {len(full)} requests."]
    for name in res["servers"]:
        if name != "mlxd":
            L.append(f"{name}: {a[name][-1]['prompt_tokens']} prompt tokens at the last request (mlxd "
                     f"{a['mlxd'][-1]['prompt_tokens']}); sum of TTFT over requests 2-{len(a[name])} "
                     f"{sum(s['ttft'] or 0 for s in a[name][1:]):.1f} s (mlxd "
                     f"{sum(s['ttft'] or 0 for s in a['mlxd'][1:]):.1f} s).")
    return [" ".join(L)]


def json_verdict(d: dict | None) -> str:
    if not d:
        return "not run"
    if d.get("error") and not d["json"]:
        return "rejected"
    if all(c["text"] == p["text"] for c, p in zip(d["json"], d["plain"])):
        return "ignored (output identical to unconstrained)"
    tp, tc = median([x["decode_tps"] for x in d["plain"]]), median([x["decode_tps"] for x in d["json"]])
    return f"{tc / tp:.2f}x ({tc:.1f} vs {tp:.1f} tok/s)" if tp and tc else "n/a"


def json_lines(d: dict | None) -> list[str]:
    if not d:
        return ["Not run (mlxd not among the servers)."]
    if d.get("error") and not d["json"]:
        return [f"Skipped: the server rejected it ({d['error'][:300]})."]
    L = [f"Same {len(JSON_CHAT)}-message prompt with and without `response_format` (a {len(PROJECT_SCHEMA['required'])}"
         f"-field schema, strict), alternating, max_tokens {JSON_TOKENS}; decode speed from the first to the last "
         "output chunk.", "",
         "| request | decode tok/s (median) | runs | tokens | schema-valid JSON |", "|---|---|---|---|---|"]
    for kind, xs in (("unconstrained", d["plain"]), ("json_schema", d["json"])):
        L.append(f"| {kind} | {fmt(median([x['decode_tps'] for x in xs]), 1)} | "
                 f"{', '.join(fmt(x['decode_tps'], 1) for x in xs)} | "
                 f"{', '.join(str(x['completion_tokens']) for x in xs)} | {sum(x['valid'] for x in xs)}/{len(xs)} |")
    verdict = json_verdict(d)
    if verdict.startswith("ignored"):
        L += ["", "Skipped: the server ignored `response_format` (the output is identical to the unconstrained "
                  "one), so there is no constrained decode speed to report."]
    elif verdict != "n/a":
        L += ["", f"Constrained / unconstrained decode speed: {verdict} (target >= {TARGET_JSON}x)."]
    if d.get("error"):
        L += ["", f"Stopped early: {d['error'][:300]}"]
    return L


def plot(res: dict, path: Path) -> None:
    fig, ax = ttft_axes("Scripted coding-agent session, SmolLM2-135M f32, CPU + OpenBLAS")
    if fig is None:
        return
    nan = float("nan")
    x = list(range(1, len(res["requests"]) + 1))
    for name, style in zip(res["servers"], ("o-", "s-", "^-")):
        line, = ax.plot(x, [s.get("ttft") or nan for s in res["a"][name]], style, label=name)
        if (new := res["b"]["servers"].get(name)) and new.get("ttft"):
            ax.plot([1], [new["ttft"]], style[0], mfc="none", ms=12, color=line.get_color(),
                    label=f"{name}, new session's opening request")
        if f := res["floor"].get(name):
            ax.plot(x[:len(f)], [p["ttft"] if p else nan for p in f], "--", color=line.get_color(), alpha=0.6,
                    label=f"floor on {name}'s prompts")
    save_ttft_plot(fig, ax, x, "request (each adds a tool call and its result)", path)


# -- the run --------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--floor", help=argparse.SUPPRESS)          # internal: in-process measurements
    ap.add_argument("--quick", action="store_true",
                    help="smoke-test the harness (3 steps, mlxd only unless --servers; numbers meaningless)")
    ap.add_argument("--servers", help=f"comma-separated subset of {','.join(SERVERS)}")
    ap.add_argument("--messages", action="store_true",
                    help=f"also run the session through /v1/messages on a second mlxd ({MESSAGES})")
    ap.add_argument("--report", metavar="JSON", help="only rewrite the report and plot of a saved agent.json, "
                                                     "next to it")
    args = ap.parse_args()
    if args.floor:
        floor_worker(json.loads(args.floor))
        return 0
    if args.report:
        path = Path(args.report)
        res = json.loads(path.read_text())
        (path.parent / "agent.md").write_text(report(res, res.get("command", "")))
        plot(res, path.parent / "agent_ttft.png")
        return 0
    global STEPS, FLOOR_REPS, JSON_REPS
    common.QUIET_WAIT = 30.0
    names = list(SERVERS)
    if args.quick:
        STEPS, FLOOR_REPS, JSON_REPS, common.QUIET_WAIT, names = 3, 1, 1, 3.0, ["mlxd"]
    if args.servers:
        names = [n for n in SERVERS if n in args.servers.split(",")]
    if args.messages:
        names.append(MESSAGES)

    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    mdir = model_dir().path
    tokenizer = AutoTokenizer.from_pretrained(str(mdir))
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    reqs = session(count, n_steps=STEPS)
    opening_2 = session(count, USER_2, 0)[0]
    f1, f2 = (template_ids(tokenizer, fallback_render(m)) for m in (reqs[0], opening_2))
    shared = common_prefix(f1, f2)
    res = {"model_dir": str(mdir), "load_start": load_now(), "quiet_wait": common.QUIET_WAIT, "gates": [],
           "servers": names, "floor_reps": FLOOR_REPS, "startup": {}, "errors": {},
           "session": {"system_tokens": count(reqs[0][0]["content"]),
                       "tools_tokens": count("\n".join(json.dumps(t) for t in TOOLS)),
                       "opening_without_tools": len(template_ids(tokenizer, reqs[0])), "opening_fallback": len(f1)},
           "requests": [{"added": "system + user" if i == 0 else f"{m[-2]['tool_calls'][0]['function']['name']} "
                         f"call + result"} for i, m in enumerate(reqs)],
           "a": {n: [] for n in names}, "floor": {}, "b": {"servers": {}, "shared_floor_tokens": shared,
                                                          "suffix_tokens": len(f2) - shared}, "c": {}, "d": None}

    with tempfile.TemporaryDirectory(prefix="mlxd-agent-bench-") as tmp:
        tmp = Path(tmp)
        make = {"mlxd": lambda: mlxd(tmp, MLXD_CFG, cache_dir=tmp / "mlxd-cache"),
                MESSAGES: lambda: mlxd(tmp, MLXD_CFG, name=MESSAGES, cache_dir=tmp / "mlxd-messages-cache"),
                "mlx_lm.server": lambda: mlx_lm_server(tmp, mdir, preload=True),
                "vllm-mlx": lambda: vllm_mlx_server(tmp, mdir, preload=True)}
        servers = {n: make[n]() for n in names}
        floor = None
        try:
            for name, s in servers.items():
                res["startup"][name] = s.start(timeout=300)
                warm_up(s)
            floor = InProc("--floor", {"model_dir": str(mdir),
                                       "tokens": floor_tokens(tokenizer, reqs[-1], 8192 + 2048)}, tmp)

            def play(name, messages, label):
                if name in res["errors"]:
                    return None
                try:
                    r = step(servers[name], messages)
                    print(f"  {name} {label}: ttft {fmt(r['ttft'])}s prompt {r['prompt_tokens']} "
                          f"cached {r['cached_tokens']} first {r['first_kind']}", flush=True)
                    return r
                except Exception as e:
                    res["errors"][name] = f"{label}: {type(e).__name__}: {e}"[:3000]
                    print(f"  {name} FAILED: {res['errors'][name][:300]}", flush=True)
                    return None

            def floor_for(series, name, i, reps):
                """The floor of request i on `name`'s token counts (None where it has none)."""
                steps = res["a"][name]
                if i >= len(steps) or not steps[i].get("prompt_tokens"):
                    return None
                prev = steps[i - 1]["prompt_tokens"] if i else 0
                if prev is None:
                    return None
                f = floor.call({"series": series, "reuse": prev, "new": steps[i]["prompt_tokens"] - prev,
                                "reps": reps})
                print(f"  floor ({series}) request {i + 1}: ttft {f['ttft']:.3f}s new {f['new']}", flush=True)
                return f

            empty = {"ttft": None, "prompt_tokens": None, "cached_tokens": None}
            for i, messages in enumerate(reqs):                    # (a), round-robin, rotating who goes first
                res["gates"].append(wait_quiet())
                order = names[i % len(names):] + names[:i % len(names)]
                for name in order:
                    settle(servers.values())
                    res["a"][name].append(play(name, messages, f"request {i + 1}") or dict(empty))
                reps = 1 if i == 0 else FLOOR_REPS                 # the cold opening request: once
                sizes = {n: [s["prompt_tokens"] for s in res["a"][n]] for n in names}
                for name in names:                                 # servers with the same prompt sizes share one
                    twin = next((m for m in names[:names.index(name)] if sizes[m] == sizes[name]), None)
                    res["floor"].setdefault(name, []).append(
                        res["floor"][twin][-1] if twin else floor_for(name, name, i, reps))

            res["gates"].append(wait_quiet())                      # (b) a new session
            for name in names:
                settle(servers.values())
                res["b"]["servers"][name] = play(name, opening_2, "new session") or dict(empty)
            new = res["b"]["servers"].get("mlxd") or {}
            if new.get("prompt_tokens"):
                suffix = min(res["b"]["suffix_tokens"], new["prompt_tokens"])
                res["b"]["floor"] = floor.call({"series": "mlxd", "reuse": new["prompt_tokens"] - suffix,
                                                "new": suffix, "reps": FLOOR_REPS})
            if "mlxd" in servers:
                res["mlxd_cache_stats"] = cache_stats(servers["mlxd"])

            for name in names:                                     # (c) tool calls in the stream
                res["gates"].append(wait_quiet())
                settle(servers.values())
                res["c"][name] = [probe(servers[name], reqs[0], choice) for choice in ("auto", "required")]
                for p in res["c"][name]:
                    print(f"  {name} tool_choice={p['choice']}: {p.get('error') or p.get('calls')}", flush=True)

            if "mlxd" in servers:                                  # (d) constrained decoding
                res["gates"].append(wait_quiet())
                settle(servers.values())
                res["d"] = constrained(servers["mlxd"])
        finally:
            if floor is not None:
                floor.close()
            for s in servers.values():
                s.stop()
        res["logs"] = {p.name: log_digest(p) for p in tmp.glob("*.log")}

    plot(res, publish("agent", res, report, t_start, args.quick) / "agent_ttft.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
