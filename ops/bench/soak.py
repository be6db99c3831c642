"""Soak: models under mixed load while a chaos loop edits the YAML, signals workers and spoils the cache.

For a fixed time (bounded; loopback only) clients send streams, non-streams, cancels, long
prompts and repeated greedy prompts (cache hits) to a control model that nothing touches
and to chaos models, while a chaos loop adds, removes, changes, breaks and fixes the YAML,
sends SIGHUP, SIGKILLs and SIGSTOPs chaos workers, fills the cache dir (a small tmpfs when
`mount` works, else a plain dir with small disk budgets) and corrupts cache files. It also
plays a web page of another origin (what a page can send without a preflight), opens
streams whose client stops reading (slow readers, on a model of their own that nothing else
uses, so the burst knows when the daemon is done with them), and edits a chaos
model's engine setting and reverts the edit before the replacement worker is ready.

Invariants, checked continuously and reported (each violation with its detail):
- every request ends within its deadline: 200 and complete, a 4xx/5xx in OpenAI's format
  (a 500 "internal error" counts as a violation: it is an unhandled exception), or a stream
  ending with an error event; never a hang, a dropped connection or a silent stream end;
- the control model fails nothing (every request 200 and complete, SIGHUP included);
- greedy answers of the control model are identical to its first (cold) answer per prompt;
- worker RSS, daemon RSS and cache dir size stay within budgets derived from the config;
- no worker outlives its model for long during the run; at the end (daemon stopped) no
  worker process of this cache dir is left and no `*.tmp.*` file is in the cache dir;
- the daemon never dies, converges to the final config and exits 0 on SIGTERM;
- the page's requests (a foreign Origin, text/plain or empty bodies, a rebinding Host) are
  all refused with a 403 in the route's error shape and no CORS header (the page reads
  nothing), each counted as refused, and none takes effect (the control model stays
  loaded, unpinned, on the same worker);
- a slow reader's stream is cut once its write has waited `server.stream_write_timeout` (its
  slot freed), or ends because it all fit in the buffers, within request_timeout + the
  deadline; every cut is counted in `mlxd_stream_write_timeouts_total` and nothing else is;
- after an edit reverted before its replacement was ready, the model ends served by a
  worker with the reverted settings.

Run: .venv/bin/python ops/bench/soak.py [--duration 600] [--seed 0]
Writes ops/bench/results/soak.{json,md}; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Mlxd, smol  # noqa: E402

RESULTS = ROOT / "ops" / "bench" / "results"
MiB = 2**20
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4    # SmolLM2-135M in f32: layers x (K, V) x KV heads x head dim x 4 B
CTL, A, B = "soak-ctl", "soak-a", "soak-b"
SLOW = "soak-slow"                 # only the slow readers use it: its admitted requests are theirs
ALL_FAULTS = ("yaml_add", "yaml_remove", "yaml_change", "yaml_break", "sighup", "sigkill", "sigstop",
              "fill", "corrupt", "cross_origin", "slow_readers", "edit_revert")
SYSTEM = ("You are a terse assistant inside a soak test of a model server. Answer in one short sentence, "
          "without lists, without code, and without repeating the question back to the user.")
WORDS = ("cache worker daemon batch token prefix stream model budget signal reload config memory disk "
         "request answer crash restart drain queue").split()
_doc = random.Random(42)
# Short ones hit in memory; the long ones' entries (~20 MB) get evicted, so they also hit on disk
# (and are larger than a small memory budget).
GREEDY = ("Name three colors.", "What is the capital of France?", "Count from one to five.",
          "Say hello to a cat.",
          *(f"Document {i}: " + " ".join(_doc.choice(WORDS) for _ in range(400)) + "\nIn one sentence, what is it about?"
            for i in range(2)))
LONG_WORDS = (250, 450)           # ~320-560 prompt tokens with the template
MAX_SEQ = 640                     # tokens of the longest entry a request can store (prompt + completion)
SLOW_TOKENS = 560                 # a slow reader's answer: ~1 MB with logprobs, within MAX_SEQ
PAGE_ORIGINS = ("http://evil.example", "http://127.0.0.1:{page_port}")   # a site; a page on another local port


@dataclass
class Plan:
    """One run's settings; the test uses a shorter, lighter one."""
    duration: float = 600.0
    seed: int = 0
    faults: tuple[str, ...] = ALL_FAULTS
    extra_model: bool = True          # soak-b comes and goes (three models at most)
    ctl_clients: int = 2
    chaos_clients: int = 2
    chaos_every: tuple[float, float] = (2.0, 6.0)
    hang_timeout: float = 20.0        # server.worker_hang_timeout: long SIGSTOPs exceed it
    request_timeout: float = 150.0    # server.request_timeout (504 past it)
    deadline: float = 240.0           # client side: every request must have ended by then
    tmpfs_mib: int = 256
    recover_timeout: float = 300.0
    worker_overhead_mib: int = 512    # Python + MLX + OpenBLAS + tokenizer + allocator slack, see README
    stream_write_timeout: float = 5.0  # server.stream_write_timeout: what frees a slow reader's slot
    slow_readers: int = 2             # streams per slow-reader burst, on SLOW
    revert_timeout: float = 180.0     # an edit-and-revert must end on the reverted settings by then


def base_models(plan: Plan) -> dict[str, dict]:
    return {
        CTL: smol(CTL, aliases=["ctl"], engine={"max_batch_size": 4, "prefill_step_size": 128},
                  sampling={"temperature": 0.0, "max_tokens": 16},
                  prefix_cache={"memory_budget": "64MiB", "disk_budget": "64MiB"}),
        # before A: a save cut short past A's entry keeps it
        SLOW: smol(SLOW, engine={"max_batch_size": 2}, sampling={"temperature": 0.0},
                   prefix_cache={"memory_budget": "16MiB", "disk_budget": "16MiB"}),
        A: smol(A, aliases=["chaos"], engine={"max_batch_size": 4, "prefill_step_size": 256},
                sampling={"max_tokens": 16}, prefix_cache={"memory_budget": "48MiB", "disk_budget": "96MiB"}),
    }


EXTRA = smol(B, engine={"max_batch_size": 2}, sampling={"max_tokens": 8},
             prefix_cache={"memory_budget": "32MiB", "disk_budget": "32MiB"})

# One edit of soak-a: (path, values). Engine and prefix_cache edits replace its worker (8 MiB
# memory budget is smaller than a long prompt's entry; kv_bits moves it to another namespace);
# sampling and aliases apply live.
CHANGES = [(("engine", "max_batch_size"), (2, 4, 6)), (("engine", "prefill_step_size"), (64, 256)),
           (("prefix_cache", "memory_budget"), ("8MiB", "48MiB")), (("prefix_cache", "kv_bits"), (None, 8)),
           (("prefix_cache", "disk_budget"), ("16MiB", "96MiB")), (("sampling", "max_tokens"), (8, 24)),
           (("aliases",), (["chaos"], ["chaos2"]))]

BROKEN = {
    "syntax": lambda good: good + "\n  - name: [unclosed\n",
    # a save cut short, past the control model's entry: it may even parse (soak-a reset or gone)
    "truncated": lambda good: good[: good.index(f"- name: {A}") + len(good[good.index(f"- name: {A}"):]) // 2],
    "empty": lambda good: "",
    "invalid_value": lambda good: good.replace("max_batch_size: 4", "max_batch_size: 0", 1),
    "unknown_field": lambda good: good.replace("models:\n", "models:\n- {name: x, source: embedded:smollm2, bogus: 1}\n", 1),
    "duplicate_name": lambda good: good + f"- {{name: {CTL}, source: embedded:smollm2}}\n",
}


def size_of(v) -> int:
    from daemon.config import parse_size
    return parse_size(v)


# -- processes and files ------------------------------------------------------------------

def workers_of(cache_dir: Path) -> dict[int, str]:
    """pid -> model name of every live worker process started for this cache dir."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or b"daemon.worker" not in args or str(cache_dir).encode() not in args:
            continue
        try:
            out[int(p.name)] = json.loads(args[args.index(b"--model") + 1])["name"]
        except (ValueError, IndexError, KeyError):
            out[int(p.name)] = "?"
    return out


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cache_files(cache_dir: Path) -> list[Path]:
    """Files of the prefix cache (the models/ symlink and the ballast are not the cache)."""
    prefix = cache_dir / "prefix"
    return [p for p in prefix.rglob("*") if p.is_file()] if prefix.exists() else []


def namespace_bytes(cache_dir: Path) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for p in cache_files(cache_dir):
        try:
            out[p.parent.name] += p.stat().st_size
        except OSError:
            pass
    return dict(out)


def fill(path: Path, limit: int) -> int:
    """Append zeros to `path` until the file system is full (or `limit` bytes); bytes written."""
    written = 0
    try:
        with open(path, "ab") as f:
            while written < limit:
                f.write(b"\0" * MiB)
                f.flush()
                written += MiB
    except OSError:
        pass
    return written


def mount_tmpfs(path: Path, mib: int) -> str | None:
    """Mount a tmpfs of `mib` MiB on `path`; the reason when that is not possible (no root, a container)."""
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def worker_engine(pid: int) -> dict | None:
    """The engine settings a live worker process was started with (its --model argument)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return json.loads(args[args.index(b"--model") + 1]).get("engine")
    except (OSError, ValueError, IndexError):
        return None


def slow_reader(port: int, model: str) -> socket.socket:
    """A stream whose client reads its status line and nothing more, on a small receive buffer;
    logprobs make each token ~1.5 KB, so the buffers fill within a few hundred tokens."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": SLOW_TOKENS, "logprobs": True,
                       "top_logprobs": 20, "temperature": 0.0,    # counting: it does not stop early
                       "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body))
    return s


def status_line(s: socket.socket) -> bytes:
    """The response's first line, peeked (nothing is taken from the buffer); b"" if none yet."""
    try:
        head = s.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    return head.split(b"\r\n", 1)[0] if b"\r\n" in head else b""


def drain(s: socket.socket, limit: float) -> str:
    """Read the rest: "cut" (the server closed it before the body's end), "complete" (the
    chunked body's last chunk came), "open" (still sending after `limit` seconds)."""
    data, end = b"", time.monotonic() + limit
    s.settimeout(1.0)
    while time.monotonic() < end:
        try:
            got = s.recv(1 << 16)
        except socket.timeout:
            continue
        except OSError:
            return "cut"
        if not got:
            return "complete" if data.endswith(b"\r\n0\r\n\r\n") else "cut"
        data = (data + got)[-64:]
        if data.endswith(b"\r\n0\r\n\r\n"):
            return "complete"
    return "open"


STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
DEATH = re.compile(r"the worker for model '([^']+)' (exited with status -?\d+|was killed by (\w+))")


def _stamp(line: str) -> float | None:
    m = STAMP.match(line)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


def log_excerpt(log: Path, wall: float, before: float = 6.0, after: float = 2.0, limit: int = 12) -> list[str]:
    """Errors and warnings (with their tracebacks) the daemon logged within [wall - before, wall + after]."""
    out, keep, t = [], False, None
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if (st := _stamp(line)) is not None:
            t = st
            keep = wall - before <= t <= wall + after and (" ERROR " in line or " WARNING " in line)
            if keep:
                out.append(line[:400])
        elif keep or (t is not None and wall - before <= t <= wall + after and line.startswith("Traceback")):
            keep = True
            out.append(line[:400])
    return out[-limit:]


def log_findings(log: Path) -> list[dict]:
    """What the daemon's log (its workers' stderr included) says went wrong by itself: a worker that
    died of anything but our SIGKILL (ours, or hang detection's), and every traceback."""
    out = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    t, tb = 0.0, None
    for line in lines:
        if (st := _stamp(line)) is not None:
            t = st
        if tb is not None:
            tb.append(line[:300])
            if not line.startswith((" ", "Traceback", "During handling", "The above exception")) and line.strip():
                out.append({"wall": t, "invariant": "no_unhandled_exceptions",
                            "detail": f"traceback ending in {line.strip()[:200]}", "excerpt": tb[-12:]})
                tb = None
            continue
        if line.startswith("Traceback (most recent call last)"):
            tb = [line]
        elif (m := DEATH.search(line)) and m.group(3) != "SIGKILL":
            out.append({"wall": t, "invariant": "workers_die_only_by_injected_faults",
                        "detail": f"model {m.group(1)!r}: {m.group(0)}", "excerpt": [line[:400]]})
    return out


# -- the run --------------------------------------------------------------------------------

class Soak:
    """One run: the daemon, the traffic, the chaos, the monitor, and what they saw."""

    def __init__(self, plan: Plan, tmp: Path):
        self.plan, self.tmp = plan, Path(tmp)
        self.rng = random.Random(plan.seed)
        self.t0 = self.wall0 = self.wall = 0.0
        self.weights = 0
        self.requests, self.faults, self.violations = [], [], []
        self.cold: dict[str, str] = {}                  # greedy prompt -> first answer
        self.greedy_checks: Counter = Counter()
        self.models: dict[str, dict] = {}               # the last good config written
        self.desired_since: dict[str, float] = {}
        self.broken_since: float | None = None
        self.ns_budget: dict[str, int] = {}             # namespace kind -> largest disk budget configured
        self.mem_budget: dict[str, int] = {}            # model -> largest memory budget configured
        self.batch: dict[str, int] = {}                 # model -> largest max_batch_size configured
        self.stopped: dict[int, str] = {}               # SIGSTOPped pid -> model
        self.surplus_since: dict[int, float] = {}
        self.peaks: dict = {}
        self.peak_disk: dict[str, int] = {}
        self.final_disk: dict[str, int] = {}
        self.leaked: set[int] = set()
        self.disk_over: set[str] = set()
        self.daemon_over = self.dead = self.finished = self.stop_traffic = False
        self.tmpfs = ""
        self.unavailable: dict[str, str] = {}     # fault kind -> why it cannot be injected here
        self.page: Counter = Counter()            # the cross-origin page's requests, by outcome
        self.slow: Counter = Counter()            # slow readers, by how their stream ended
        self.reverts: Counter = Counter()         # edits reverted before their replacement was ready
        self.slow_burst: asyncio.Task | None = None

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def violate(self, invariant: str, detail: str, **ctx) -> None:
        v = {"t": self.now(), "wall": time.time(), "invariant": invariant, "detail": detail[:600], **ctx}
        self.violations.append(v)
        print(f"[{v['t']:7.1f}s] VIOLATION {invariant}: {detail[:300]}", flush=True)

    # -- config ----------------------------------------------------------------------------

    def config_text(self, models: dict[str, dict]) -> str:
        server = {"port": self.d.port, "cache_dir": str(self.d.cache_dir), "worker_hang_timeout": self.plan.hang_timeout,
                  "request_timeout": self.plan.request_timeout, "drain_timeout": 20, "shutdown_timeout": 20,
                  "stream_write_timeout": self.plan.stream_write_timeout}
        return yaml.safe_dump({"server": server, "models": list(models.values())}, sort_keys=False)

    def write(self, text: str) -> None:
        """Half the saves in place, half as editors do it (temp file renamed over)."""
        path = self.d.config_path
        if self.rng.random() < 0.5:
            path.write_text(text)
        else:
            tmp = path.with_name(f".{path.name}.swp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def apply_models(self, models: dict[str, dict]) -> None:
        self.models = models
        self.broken_since = None
        for m in models.values():
            pc = m.get("prefix_cache", {})
            kind = f"kv{pc['kv_bits']}" if pc.get("kv_bits") else "kvf"
            self.ns_budget[kind] = max(self.ns_budget.get(kind, 0), size_of(pc.get("disk_budget", "8GiB")))
            self.mem_budget[m["name"]] = max(self.mem_budget.get(m["name"], 0), size_of(pc.get("memory_budget", "1GiB")))
            self.batch[m["name"]] = max(self.batch.get(m["name"], 0), m.get("engine", {}).get("max_batch_size", 8))
            self.desired_since.setdefault(m["name"], time.monotonic())
        for name in list(self.desired_since):
            if name not in models:
                del self.desired_since[name]
        self.write(self.config_text(models))

    # -- traffic ---------------------------------------------------------------------------

    def make_request(self, rng: random.Random, model: str, n: int) -> dict:
        kind = rng.choices(["greedy", "short", "long", "cancel"], weights=[35, 30, 15, 20])[0]
        req = {"model": model, "kind": kind, "stream": rng.random() < 0.5, "endpoint": "chat"}
        if kind == "greedy":
            req.update(prompt=rng.choice(GREEDY), max_tokens=12, temperature=0.0)
        elif kind == "long":
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*LONG_WORDS)))
            req.update(prompt=f"Request {n}. Summarize in a few words: {words}", max_tokens=8)
        else:
            req.update(prompt=f"Request {n}: write one sentence about a {rng.choice(WORDS)}.",
                       max_tokens=rng.choice((4, 8, 16)))
            if kind == "short" and rng.random() < 0.3:
                req["endpoint"] = "completion"
            if kind == "cancel":
                req.update(stream=rng.random() < 0.6, cancel_after=rng.choice((1, 2, 3)),
                           cancel_delay=rng.uniform(0.2, 3.0))
        return req

    async def send(self, client: openai.AsyncOpenAI, req: dict) -> dict:
        """One request, classified: ok, error, stream_error, cancelled, or a violation outcome."""
        common = {"model": req["model"], "max_tokens": req["max_tokens"]}
        if "temperature" in req:
            common["temperature"] = req["temperature"]
        if req["endpoint"] == "chat":
            create = client.chat.completions.create
            common["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": req["prompt"]}]
        else:
            create = client.completions.create
            common["prompt"] = req["prompt"]
        if not req["stream"]:
            call = asyncio.ensure_future(create(**common))
            try:
                if req["kind"] == "cancel":
                    done, _ = await asyncio.wait({call}, timeout=req["cancel_delay"])
                    if not done:
                        return {"outcome": "cancelled"}
                r = await call
            finally:
                if not call.done():
                    call.cancel()
                    with contextlib.suppress(BaseException):
                        await call
            choice = r.choices[0]
            text = choice.message.content if req["endpoint"] == "chat" else choice.text
            if choice.finish_reason not in ("stop", "length") or text is None:
                return {"outcome": "incomplete", "detail": f"finish_reason {choice.finish_reason!r}"}
            return {"outcome": "ok", "text": text, "cached": r.usage.prompt_tokens_details.cached_tokens}
        stream = await create(**common, stream=True, stream_options={"include_usage": True})
        parts, finish, cached, chunks = [], None, None, 0
        async with stream:
            async for ch in stream:
                chunks += 1
                if ch.usage is not None:
                    cached = ch.usage.prompt_tokens_details.cached_tokens
                for c in ch.choices:
                    parts.append((c.delta.content or "") if req["endpoint"] == "chat" else (c.text or ""))
                    finish = c.finish_reason or finish
                if req["kind"] == "cancel" and chunks >= req["cancel_after"]:
                    return {"outcome": "cancelled"}
        if finish not in ("stop", "length"):
            return {"outcome": "incomplete", "detail": f"stream ended without a finish_reason or an error "
                                                       f"({chunks} chunks)"}
        return {"outcome": "ok", "text": "".join(parts), "cached": cached}

    async def one(self, client, req: dict) -> None:
        start = time.monotonic()
        rec = {**req, "t": self.now()}
        try:
            rec.update(await asyncio.wait_for(self.send(client, req), self.plan.deadline))
        except asyncio.TimeoutError:
            rec.update(outcome="timeout", detail=f"no end within {self.plan.deadline:.0f}s")
        except openai.APIStatusError as e:
            rec.update(status=e.status_code, **error_outcome(e.response.text, e.status_code))
        except openai.APIConnectionError as e:
            rec.update(outcome="connection", detail=f"{type(e).__name__}: {e.__cause__ or e}")
        except openai.APIError as e:     # an SSE error event mid-stream
            rec.update(**error_outcome(json.dumps({"error": e.body}), None), stream_error=True)
        except Exception as e:  # noqa: BLE001 - anything else is a finding, listed with its type
            rec.update(outcome="client_exception", detail=f"{type(e).__name__}: {e}")
        rec["latency"] = round(time.monotonic() - start, 3)
        rec.pop("cancel_delay", None)
        self.requests.append(rec)
        self.judge(rec)

    def judge(self, rec: dict) -> None:
        out = rec["outcome"]
        if out in ("timeout", "connection", "client_exception", "incomplete", "bad_error", "internal_error"):
            self.violate("request_must_end_cleanly", f"{rec['model']} {rec['kind']} {rec['endpoint']} "
                         f"stream={rec['stream']}: {out}: {rec.get('detail')}", request=_brief(rec))
        elif rec["model"] in (CTL, "ctl") and out not in ("ok", "cancelled"):
            self.violate("control_model_never_fails", f"{rec['model']} {rec['kind']} stream={rec['stream']}: "
                         f"{out} {rec.get('status')} {rec.get('code')}: {rec.get('detail')}", request=_brief(rec))
        if rec["model"] in (CTL, "ctl") and rec["kind"] == "greedy" and out == "ok":
            prompt = rec["prompt"]
            if prompt not in self.cold:
                self.cold[prompt] = rec["text"]
                self.greedy_checks["cold"] += 1
            elif rec["text"] != self.cold[prompt]:
                self.violate("greedy_identical_to_cold", f"{prompt!r}: cold {self.cold[prompt]!r}, now "
                             f"{rec['text']!r} (cached_tokens {rec.get('cached')})", request=_brief(rec))
            else:
                self.greedy_checks["identical_cache_hit" if rec.get("cached") else "identical_no_hit"] += 1

    async def client_loop(self, i: int, models: list[str]) -> None:
        rng = random.Random(self.plan.seed * 1000 + i)
        async with openai.AsyncOpenAI(base_url=f"{self.d.url}/v1", api_key="unused", max_retries=0,
                                      timeout=self.plan.deadline + 30) as client:
            n = 0
            while not (self.stop_traffic or self.dead):
                n += 1
                await self.one(client, self.make_request(rng, rng.choice(models), i * 100000 + n))
                await asyncio.sleep(rng.uniform(0, 0.5))

    # -- chaos -----------------------------------------------------------------------------

    def fault(self, kind: str, detail: str, injected: bool = True) -> None:
        self.faults.append({"t": self.now(), "kind": kind, "detail": detail, "injected": injected})
        print(f"[{self.now():7.1f}s] {kind}: {detail}", flush=True)

    async def chaos_loop(self) -> None:
        rng = self.rng
        end = self.t0 + self.plan.duration
        deck: list[str] = []
        while time.monotonic() < end and not self.dead:
            await asyncio.sleep(rng.uniform(*self.plan.chaos_every))
            if self.broken_since is not None and time.monotonic() - self.broken_since > 5:
                self.apply_models(self.models)
                self.fault("yaml_fix", "the good config saved again")
                continue
            if not deck:        # every kind once per round, in a random order
                deck = rng.sample(self.plan.faults, len(self.plan.faults))
            kind = deck.pop()
            await getattr(self, f"do_{kind}")()

    async def do_yaml_add(self):
        if B in self.models or not self.plan.extra_model:
            return await self.do_yaml_change()
        m = {**copy.deepcopy(EXTRA), "preload": self.rng.random() < 0.5}
        self.apply_models({**self.models, B: m})
        self.fault("yaml_add", f"{B} (preload {m['preload']})")

    async def do_yaml_remove(self):
        if B not in self.models:
            return await self.do_yaml_add()
        self.apply_models({k: v for k, v in self.models.items() if k != B})
        self.fault("yaml_remove", B)

    async def do_yaml_change(self):
        path, values = self.rng.choice(CHANGES)
        m = copy.deepcopy(self.models[A])
        node = m
        for p in path[:-1]:
            node = node.setdefault(p, {})
        value = self.rng.choice([v for v in values if v != node.get(path[-1])] or values)
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
        self.apply_models({**self.models, A: m})
        self.fault("yaml_change", f"{A} {'.'.join(path)} = {value}")

    async def do_yaml_break(self):
        how = self.rng.choice(sorted(BROKEN))
        self.write(BROKEN[how](self.config_text(self.models)))
        self.broken_since = time.monotonic()
        self.fault("yaml_break", how)

    async def do_sighup(self):
        self.d.proc.send_signal(signal.SIGHUP)
        self.fault("sighup", f"daemon pid {self.d.proc.pid}")

    def chaos_worker(self) -> tuple[int, str] | None:
        live = [(pid, name) for pid, name in workers_of(self.d.cache_dir).items()
                if name in (A, B) and pid not in self.stopped]
        return self.rng.choice(live) if live else None

    async def do_sigkill(self):
        if (w := self.chaos_worker()) is None:
            return self.fault("sigkill", "no chaos worker running", injected=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(w[0], signal.SIGKILL)
        self.fault("sigkill", f"{w[1]} worker pid {w[0]}")

    async def do_sigstop(self):
        if (w := self.chaos_worker()) is None:
            return self.fault("sigstop", "no chaos worker running", injected=False)
        pid, name = w
        long = self.rng.random() < 0.3
        secs = self.plan.hang_timeout + 10 if long else self.rng.uniform(2, self.plan.hang_timeout / 2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            self.stopped[pid] = name
            self.fault("sigstop", f"{name} worker pid {pid} for {secs:.0f}s ({'past' if long else 'within'} "
                                  f"worker_hang_timeout {self.plan.hang_timeout:.0f}s)")
            asyncio.get_running_loop().call_later(secs, self.resume, pid)

    def resume(self, pid: int) -> None:
        if self.stopped.pop(pid, None) is not None and pid in workers_of(self.d.cache_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    async def do_fill(self):
        if not self.tmpfs:
            return self.fault("fill", "no tmpfs: skipped", injected=False)
        ballast = self.d.cache_dir / "ballast"
        written = await asyncio.to_thread(fill, ballast, self.plan.tmpfs_mib * MiB)
        secs = self.rng.uniform(5, 15)
        self.fault("fill", f"tmpfs filled with {written // MiB} MiB of ballast for {secs:.0f}s")
        asyncio.get_running_loop().call_later(secs, lambda: ballast.unlink(missing_ok=True))

    async def do_corrupt(self):
        files = [p for p in cache_files(self.d.cache_dir) if ".tmp" not in p.name]
        if not files:
            return self.fault("corrupt", "no cache file yet", injected=False)
        p = self.rng.choice(files)
        how = "record" if p.suffix == ".json" else self.rng.choice(("flip", "truncate", "empty", "foreign"))
        try:
            size = p.stat().st_size
            if how == "record":
                p.write_text('{"key": "not this one", "size": 1')
            elif how == "flip":
                with open(p, "r+b") as f:
                    for _ in range(8):
                        f.seek(self.rng.randrange(max(1, size)))
                        f.write(os.urandom(8))
            elif how == "truncate":
                os.truncate(p, size // 2)
            elif how == "empty":
                os.truncate(p, 0)
            else:
                other = [q for q in files if q.suffix == p.suffix and q != p]
                if not other:
                    return self.fault("corrupt", "no second entry to swap in", injected=False)
                p.write_bytes(self.rng.choice(other).read_bytes())
        except OSError as e:
            return self.fault("corrupt", f"{p.name}: {e}", injected=False)
        self.fault("corrupt", f"{how} {p.parent.name[:12]}../{p.name}")

    async def metrics(self) -> dict[str, float]:
        """The daemon's Prometheus samples by `name{labels}` (labels as the daemon writes them)."""
        async with httpx.AsyncClient(timeout=20) as c:
            text = (await c.get(f"{self.d.url}/metrics")).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    async def do_cross_origin(self):
        """What a web page in another origin can send without a preflight (no-cors fetch with a
        text/plain body, sendBeacon, a form, an empty POST), and a DNS-rebinding page: every one
        refused (403 in the route's shape, no CORS header, counted as refused), none in effect."""
        port = self.d.port
        origin = self.rng.choice(PAGE_ORIGINS).format(page_port=port + 1)
        chat = json.dumps({"model": CTL, "max_tokens": 4, "messages": [{"role": "user", "content": "from a page"}]})
        plain, form = {"Content-Type": "text/plain;charset=UTF-8"}, {"Content-Type": "application/x-www-form-urlencoded"}
        page = [("POST", "/v1/chat/completions", chat, plain),
                ("POST", "/v1/completions", json.dumps({"model": CTL, "prompt": "x", "max_tokens": 4}), plain),
                ("POST", "/v1/messages", json.dumps({"model": CTL, "max_tokens": 4, "messages": []}), plain),
                ("POST", f"/v1/models/{CTL}/unload", "", {}),
                ("POST", f"/v1/models/{CTL}/pin", "", plain),
                ("POST", f"/v1/models/{A}/unload", "", {"Sec-Fetch-Site": "cross-site"}),
                ("POST", "/admin/reload", "", form),
                ("DELETE", "/v1/cache", "", {}),
                ("GET", "/v1/status", None, {})]
        sent = [(m, path, body, {"Origin": origin, **h}) for m, path, body, h in page]
        rebound = f"evil.example:{port}"     # a hostname of the page's that resolves to 127.0.0.1
        sent += [("GET", "/v1/status", None, {"Host": rebound}),
                 ("POST", "/v1/chat/completions", chat, {"Host": rebound, "Content-Type": "application/json"}),
                 ("POST", f"/v1/models/{CTL}/unload", "", {"Host": rebound})]
        before, ctl = await self.metrics(), (await self.status_of(CTL))
        bad = []
        async with httpx.AsyncClient(timeout=30) as c:
            for method, path, body, headers in sent:
                try:
                    r = await c.request(method, f"{self.d.url}{path}", content=body, headers=headers)
                except httpx.HTTPError as e:
                    bad.append(f"{method} {path}: {type(e).__name__}: {e}")
                    continue
                try:
                    err = r.json()["error"]
                    shaped = isinstance(err["message"], str) and bool(err["message"])
                except (ValueError, KeyError, TypeError):
                    shaped = False
                if r.status_code != 403 or not shaped or "access-control-allow-origin" in r.headers:
                    bad.append(f"{method} {path} ({headers.get('Origin') or 'Host ' + headers['Host']}): "
                               f"{r.status_code} {r.text[:120]!r} ACAO={r.headers.get('access-control-allow-origin')}")
                self.page["refused" if r.status_code == 403 else f"answered {r.status_code}"] += 1
        after, ctl_after = await self.metrics(), (await self.status_of(CTL))
        counted = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("mlxd_http_refused_total"))
        if counted != len(sent):
            bad.append(f"{counted:g} refusals counted for the page's {len(sent)} requests")
        effect = {k: (ctl.get(k), ctl_after.get(k)) for k in ("state", "pinned", "pid", "workers_started")
                  if ctl.get(k) != ctl_after.get(k)}
        if effect or ctl_after.get("pinned"):
            bad.append(f"the page's requests took effect on {CTL}: {effect or 'pinned'}")
        for b in bad:
            self.violate("cross_origin_refused_and_inert", b)
        self.fault("cross_origin", f"{len(sent)} requests from {origin} and Host {rebound}: "
                                   f"{len(sent) - len(bad)} refused as they must be")

    async def status_of(self, name: str) -> dict:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return next((m for m in (await self.status())["models"] if m["name"] == name), {})
        return {}

    async def do_slow_readers(self):
        if self.slow_burst is not None and not self.slow_burst.done():
            return self.fault("slow_readers", "the last burst is still held", injected=False)
        self.slow_burst = asyncio.create_task(self.slow_readers_burst())
        self.fault("slow_readers", f"{self.plan.slow_readers} streams on {SLOW} whose client stops reading")

    async def slow_readers_burst(self):
        """Streams on SLOW (no chaos and no other client touches it) whose clients stop reading
        after the status line. They are left unread until the daemon is done with them (SLOW has
        no request admitted: each was cut once its write waited out stream_write_timeout, or its
        whole answer fit in the buffers), or for request_timeout + stream_write_timeout + 30 s at
        most; then read to their end. Each must be over (cut or complete), and the cuts must be
        exactly the write timeouts counted."""
        key = f'mlxd_stream_write_timeouts_total{{model="{SLOW}"}}'
        before = (await self.metrics()).get(key, 0.0)
        socks = [await asyncio.to_thread(slow_reader, self.d.port, SLOW) for _ in range(self.plan.slow_readers)]
        ends = []
        try:
            hard = time.monotonic() + self.plan.request_timeout + self.plan.stream_write_timeout + 30
            while time.monotonic() < hard:
                await asyncio.sleep(2.0)
                heads = [status_line(s) for s in socks]
                if all(heads) and (await self.status_of(SLOW)).get("requests_admitted", 1) == 0:
                    break
            for s in socks:
                head = status_line(s)
                if head.startswith(b"HTTP/1.1 200"):
                    ends.append(await asyncio.to_thread(drain, s, 10.0))
                else:
                    ends.append("refused" if head else "no_answer")     # at capacity: not a stream
        finally:
            for s in socks:
                s.close()
        cut = ends.count("cut")
        for e in ends:
            self.slow[e] += 1
            if e in ("open", "no_answer"):
                self.violate("slow_readers_freed", f"a slow reader on {SLOW} was {e}: the daemon was still "
                             f"{'sending' if e == 'open' else 'silent'} {self.plan.request_timeout:.0f}s + after "
                             f"its client stopped reading")
        await asyncio.sleep(0.5)
        counted = (await self.metrics()).get(key, 0.0) - before
        if counted != cut:
            self.violate("slow_readers_freed", f"{cut} slow readers cut off, {counted:g} write timeouts counted "
                         f"for {SLOW} ({dict(Counter(ends))})")

    async def do_edit_revert(self):
        """An engine edit of soak-a, saved back before its replacement can be ready (with a SIGHUP
        after each save, so the daemon sees both); it must end served with the reverted settings."""
        original = copy.deepcopy(self.models)
        field, values = self.rng.choice((("max_batch_size", (2, 4, 6)), ("prefill_step_size", (64, 256))))
        engine = original[A].get("engine", {})
        old = engine.get(field)
        new = self.rng.choice([v for v in values if v != old])
        edited = copy.deepcopy(original[A])
        edited.setdefault("engine", {})[field] = new
        self.apply_models({**original, A: edited})
        self.d.proc.send_signal(signal.SIGHUP)
        delay = self.rng.uniform(0.3, 1.5)
        await asyncio.sleep(delay)
        self.apply_models(original)
        self.d.proc.send_signal(signal.SIGHUP)
        self.fault("edit_revert", f"{A} engine.{field} {old} -> {new}, reverted {delay:.1f}s later")
        deadline, st, engines = time.monotonic() + self.plan.revert_timeout, {}, {}
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            with contextlib.suppress(httpx.HTTPError, ValueError):
                full = await self.status()
                st = next((m for m in full["models"] if m["name"] == A), {})
                engines = {pid: worker_engine(pid) for pid, n in workers_of(self.d.cache_dir).items() if n == A}
                serving = engines.get(st.get("pid")) or {}
                pending = any(p.get("name") == A for p in full.get("loading", []))
                if st.get("state") == "ready" and not pending and \
                        all(e and e.get(field) == old for e in engines.values()) and serving.get(field) == old:
                    self.reverts["ended_on_reverted"] += 1
                    return
        self.reverts["violations"] += 1
        self.violate("serves_reverted_settings", f"{A}: engine.{field} {old} -> {new} -> {old}; "
                     f"{self.plan.revert_timeout:.0f}s later state {st.get('state')}, serving pid {st.get('pid')}, "
                     f"its workers' {field}: " + json.dumps({p: (e or {}).get(field) for p, e in engines.items()}))

    # -- monitor ---------------------------------------------------------------------------

    def worker_bound_mib(self, name: str) -> float:
        kv = self.batch.get(name, 8) * MAX_SEQ * KV_BYTES_PER_TOKEN * 2    # the batch's KV + a fetched copy
        return (self.weights + self.mem_budget.get(name, 2**30) + kv) / MiB + self.plan.worker_overhead_mib

    def disk_bound(self, kind: str) -> int:
        """The namespace's largest configured budget + one entry per writer that may be over it at once
        (an entry lands before the LRU trims; a temp file is in flight): four writers."""
        return self.ns_budget.get(kind, 0) + 4 * MAX_SEQ * KV_BYTES_PER_TOKEN

    async def monitor(self) -> None:
        while not self.finished:
            if self.d.proc.poll() is not None and not self.dead:
                self.dead = True
                self.violate("daemon_stays_up", f"the daemon exited with {self.d.proc.returncode}")
            workers = workers_of(self.d.cache_dir)
            now = time.monotonic()
            for pid, name in workers.items():
                rss = rss_mib(pid)
                peak = self.peaks.setdefault(pid, {"model": name, "rss_mib": 0.0})
                peak["rss_mib"] = max(peak["rss_mib"], round(rss, 1))
                bound = self.worker_bound_mib(name)
                if rss > bound and not peak.get("over"):
                    peak["over"] = True
                    self.violate("worker_memory_within_budget", f"{name} worker pid {pid}: RSS {rss:.0f} MiB > "
                                 f"bound {bound:.0f} MiB")
                newer = sum(1 for p, n in workers.items() if n == name and p > pid)
                surplus = name not in self.desired_since or newer >= 2
                if surplus:
                    since = self.surplus_since.setdefault(pid, now)
                    if now - since > 90 and pid not in self.leaked:
                        self.leaked.add(pid)
                        self.violate("no_leaked_workers_during_run", f"{name} worker pid {pid} still running "
                                     f"{now - since:.0f}s after it stopped being needed (model configured: "
                                     f"{name in self.desired_since}, newer workers: {newer})")
                else:
                    self.surplus_since.pop(pid, None)
            d_rss = rss_mib(self.d.proc.pid)
            self.peaks["daemon"] = max(self.peaks.get("daemon", 0.0), round(d_rss, 1))
            if d_rss > 400 and not self.daemon_over:
                self.daemon_over = True
                self.violate("daemon_memory_within_budget", f"daemon RSS {d_rss:.0f} MiB > 400 MiB")
            for ns, used in namespace_bytes(self.d.cache_dir).items():
                kind = ns.rsplit("-", 2)[-2] if ns.count("-") >= 2 else ns
                self.peak_disk[ns] = max(self.peak_disk.get(ns, 0), used)
                if used > self.disk_bound(kind) and ns not in self.disk_over:
                    self.disk_over.add(ns)
                    self.violate("disk_within_budget", f"namespace {ns}: {used / MiB:.0f} MiB > "
                                 f"{self.disk_bound(kind) / MiB:.0f} MiB (largest disk_budget "
                                 f"{self.ns_budget.get(kind, 0) / MiB:.0f} MiB + slack)")
            await asyncio.sleep(1.0)

    # -- phases ----------------------------------------------------------------------------

    async def status(self) -> dict:
        async with httpx.AsyncClient(timeout=20) as c:
            return (await c.get(f"{self.d.url}/v1/status")).json()

    async def recover(self) -> None:
        """After the chaos: everything resumed, the base config saved, SIGHUP; all of it must converge."""
        for pid in list(self.stopped):
            self.resume(pid)
        (self.d.cache_dir / "ballast").unlink(missing_ok=True)
        self.apply_models(base_models(self.plan))
        self.d.proc.send_signal(signal.SIGHUP)
        self.fault("recover", "base config saved, SIGHUP")
        deadline = time.monotonic() + self.plan.recover_timeout
        st = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                st = await self.status()
                models = {m["name"]: m for m in st["models"]}
                if set(models) == set(self.models) and not st["loading"] and \
                        all(m["state"] == "ready" for m in models.values()):
                    return
            await asyncio.sleep(1.0)
        self.violate("converges_after_chaos", f"not converged to {sorted(self.models)} within "
                     f"{self.plan.recover_timeout:.0f}s: " + json.dumps(
                         [(m["name"], m["state"], m["last_error"]) for m in st.get("models", [])]))

    async def final_greedy_pass(self) -> None:
        """Every greedy prompt once more on the control model after all the chaos (traffic goes on)."""
        async with openai.AsyncOpenAI(base_url=f"{self.d.url}/v1", api_key="unused", max_retries=0,
                                      timeout=self.plan.deadline + 30) as client:
            for prompt in list(self.cold):
                await self.one(client, {"model": CTL, "kind": "greedy", "stream": False, "endpoint": "chat",
                                        "prompt": prompt, "max_tokens": 12, "temperature": 0.0})

    async def run(self) -> None:
        chaos_models = [A, "chaos", "chaos2"] + ([B] if self.plan.extra_model else [])
        clients = [asyncio.create_task(self.client_loop(i, [CTL, "ctl"])) for i in range(self.plan.ctl_clients)]
        clients += [asyncio.create_task(self.client_loop(100 + i, chaos_models))
                    for i in range(self.plan.chaos_clients)]
        monitor = asyncio.create_task(self.monitor())
        try:
            await self.chaos_loop()
            if not self.dead:
                await self.recover()
                await self.final_greedy_pass()
            if self.slow_burst is not None:
                await self.slow_burst
        finally:
            self.stop_traffic = True
            done, pending = await asyncio.wait(clients, timeout=self.plan.deadline + 60)
            for t in pending:
                t.cancel()
            for t in done:
                if t.exception() is not None:
                    self.violate("soak_client_crashed", repr(t.exception()))
            if pending:
                self.violate("request_must_end_cleanly", f"{len(pending)} client(s) still waiting at the end")
            self.finished = True
            await monitor

    def finish(self) -> None:
        """Stop the daemon; nothing of it may be left behind."""
        for pid in list(self.stopped):
            self.resume(pid)
        code = self.d.stop(signal.SIGTERM, timeout=90, reap=False)   # leaked workers are a finding
        if code != 0 and not self.dead:
            self.violate("clean_exit", f"the daemon exited with {code} on SIGTERM")
        deadline = time.monotonic() + 30
        while (left := workers_of(self.d.cache_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            self.violate("no_leaked_workers_at_end", f"worker processes left after the daemon stopped: {left}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        tmp = [str(p.relative_to(self.d.cache_dir)) for p in cache_files(self.d.cache_dir) if ".tmp." in p.name]
        if tmp:
            self.violate("no_temp_files_at_end", f"{len(tmp)} temp file(s) left: {tmp[:5]}")
        self.final_disk = namespace_bytes(self.d.cache_dir)
        for f in log_findings(self.d.log_path):
            self.violations.append({"t": round(f["wall"] - self.wall0, 2), **f})

    def execute(self) -> dict:
        cache = self.tmp / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        why = mount_tmpfs(cache, self.plan.tmpfs_mib)
        self.tmpfs = "" if why else f"{self.plan.tmpfs_mib} MiB"
        self.storage = f"tmpfs of {self.plan.tmpfs_mib} MiB" if not why else \
            f"a plain directory (tmpfs not mounted: {why}); the fill fault is skipped, small disk budgets remain"
        if why and "fill" in self.plan.faults:
            self.unavailable["fill"] = f"no tmpfs to fill ({why})"
            print(f"soak: WARNING: the disk-full fault (fill) cannot run: tmpfs not mounted: {why}",
                  file=sys.stderr, flush=True)
        self.d = Mlxd(self.tmp, [], name="daemon", cache_dir=cache, log_level="info")
        try:
            self.apply_models(base_models(self.plan))
            print(f"soak: {self.plan.duration:.0f}s, cache on {self.storage}, log {self.d.log_path}", flush=True)
            self.d.start(timeout=600)
            served = Path(self.d.model_status(CTL)["worker"]["path"])       # the weights the workers load
            self.weights = sum(p.stat().st_size for p in served.glob("*.safetensors"))
            self.t0, self.wall0 = time.monotonic(), time.time()
            asyncio.run(self.run())
            self.wall = self.now()
            self.finish()
        finally:
            if self.d.proc is not None and self.d.proc.poll() is None:
                self.d.stop(signal.SIGKILL)
            for pid in workers_of(cache):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not why:
                time.sleep(0.5)
                unmount(cache)
        for v in self.violations:
            wall = v.pop("wall")
            v["log"] = v.pop("excerpt", None) or log_excerpt(self.d.log_path, wall)
        self.violations.sort(key=lambda v: v["t"])
        return self.summary()

    def summary(self) -> dict:
        by_model: dict[str, Counter] = defaultdict(Counter)
        for r in self.requests:
            label = r["outcome"] if r["outcome"] != "error" else f"error {r.get('status') or 'stream'} {r.get('code')}"
            by_model[r["model"]][label] += 1
        injected = Counter(f["kind"] for f in self.faults if f["injected"] and f["kind"] != "recover")
        return {
            "plan": asdict(self.plan), "storage": self.storage, "wall_s": self.wall,
            "requests": len(self.requests), "outcomes": dict(Counter(r["outcome"] for r in self.requests)),
            "by_model": {m: dict(c) for m, c in sorted(by_model.items())},
            "faults_injected": dict(sorted(injected.items())), "faults_total": sum(injected.values()),
            "faults_unavailable": self.unavailable,
            "greedy": dict(self.greedy_checks),
            "cross_origin": dict(self.page), "slow_readers": dict(self.slow), "edit_revert": dict(self.reverts),
            "bounds": {"worker_rss_mib": {n: round(self.worker_bound_mib(n)) for n in self.batch},
                       "daemon_rss_mib": 400,
                       "disk_mib": {k: round(self.disk_bound(k) / MiB) for k in self.ns_budget}},
            "peaks": {"daemon_rss_mib": self.peaks.get("daemon"),
                      "worker_rss_mib": _peak_by_model(self.peaks),
                      "disk_mib": {k: round(v / MiB, 1) for k, v in self.peak_disk.items()},
                      "disk_at_end_mib": {k: round(v / MiB, 1) for k, v in self.final_disk.items()}},
            "violations": self.violations, "faults": self.faults,
        }


def _brief(rec: dict) -> dict:
    return {k: rec[k] for k in ("t", "model", "kind", "endpoint", "stream", "latency", "status", "code")
            if k in rec}


def _peak_by_model(peaks: dict) -> dict:
    out: dict[str, float] = {}
    for pid, p in peaks.items():
        if pid != "daemon":
            out[p["model"]] = max(out.get(p["model"], 0.0), p["rss_mib"])
    return out


def error_outcome(text: str, status) -> dict:
    """An error is fine when it is OpenAI's shape; a 500 is an unhandled exception: a finding."""
    try:
        err = json.loads(text)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return {"outcome": "bad_error", "detail": f"status {status}, not OpenAI's error shape: {text[:200]!r}"}
    if status == 500:
        return {"outcome": "internal_error", "code": err.get("code"), "detail": err["message"][:300]}
    return {"outcome": "error", "code": err.get("code"), "detail": err["message"][:300]}


def markdown(s: dict, command: str) -> str:
    p = s["plan"]
    lines = [f"# mlxd soak\n\n`{command}`\n",
             f"{s['wall_s']:.0f} s ({p['duration']:.0f} s of chaos, then recovery), seed {p['seed']}, cache on "
             f"{s['storage']}; worker_hang_timeout {p['hang_timeout']:.0f} s, request deadline "
             f"{p['deadline']:.0f} s; {p['ctl_clients']} clients on the control model `{CTL}`, "
             f"{p['chaos_clients']} on the chaos models.\n",
             f"**Requests: {s['requests']}. Faults injected: {s['faults_total']}. "
             f"Invariant violations: {len(s['violations'])}.**\n",
             "| model | outcomes |", "|---|---|"]
    lines += [f"| {m} | " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) + " |" for m, c in s["by_model"].items()]
    lines += ["", "| fault | injected |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["faults_injected"].items()]
    lines += [f"| {k} | **not available**: {why} |" for k, why in s.get("faults_unavailable", {}).items()]
    g = s["greedy"]
    lines += ["", f"Greedy identity on `{CTL}`: {g.get('cold', 0)} cold answers, "
                  f"{g.get('identical_cache_hit', 0)} later answers identical with a cache hit, "
                  f"{g.get('identical_no_hit', 0)} identical without one.", "",
              f"Cross-origin page: {s.get('cross_origin', {}).get('refused', 0)} requests refused "
              f"({sum(v for k, v in s.get('cross_origin', {}).items() if k != 'refused')} answered otherwise). "
              f"Slow readers on `{SLOW}`: " + (", ".join(f"{k}: {v}" for k, v in sorted(s.get("slow_readers", {}).items()))
                                              or "none") + ". "
              f"Edits reverted before their replacement was ready: "
              f"{s.get('edit_revert', {}).get('ended_on_reverted', 0)} ended on the reverted settings, "
              f"{s.get('edit_revert', {}).get('violations', 0)} did not.", "",
              "| bound | limit | peak |", "|---|---|---|",
              f"| daemon RSS | {s['bounds']['daemon_rss_mib']} MiB | {s['peaks']['daemon_rss_mib']} MiB |"]
    lines += [f"| worker RSS {m} | {b} MiB | {s['peaks']['worker_rss_mib'].get(m)} MiB |"
              for m, b in s["bounds"]["worker_rss_mib"].items()]
    lines += [f"| cache namespace {k} | {b} MiB | " + ", ".join(
        f"{v} MiB" for ns, v in s["peaks"]["disk_mib"].items() if f"-{k}-" in ns) + " |"
        for k, b in s["bounds"]["disk_mib"].items()]
    lines += ["", f"Violations: {len(s['violations'])}"]
    for v in s["violations"]:
        lines.append(f"- [{v['t']:.0f} s] **{v['invariant']}**: {v['detail']}")
        lines += [f"    - `{line}`" for line in v.get("log", [])[-4:]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of chaos (at most 3600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="where soak.json and soak.md go")
    args = p.parse_args(argv)
    plan = Plan(duration=min(args.duration, 3600), seed=args.seed)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "ops/bench/soak.py", *(argv or sys.argv[1:])])
    summary = Soak(plan, Path(tempfile.mkdtemp(prefix="mlxd-soak-"))).execute()
    summary["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=1))
    report = markdown(summary, command)
    (args.out / "soak.md").write_text(report)
    print(report)
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
