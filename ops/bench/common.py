"""Shared pieces of the benchmarks: the one way to start mlxd and its peers, the model, a streaming client.

Every server runs alone (2 CPU cores: anything beside it would skew its numbers), on
127.0.0.1, with a log under the run's temp dir; every wait and request has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "ops" / "bench" / "results"
MODELS_CACHE = ROOT / ".cache" / "test"          # shares the tests' imported models
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
PEER_BIN = {"mlx-lm": ROOT / ".venv-bench/mlx-lm/bin", "vllm-mlx": ROOT / ".venv-bench/vllm-mlx/bin"}


def model_dir():
    """The f32 mlx-lm directory of SmolLM2-135M-Instruct that mlxd serves (resolved like its worker)."""
    from daemon.models.sources import resolve_model

    return resolve_model("embedded:smollm2", dtype="float32", cache_dir=MODELS_CACHE)


def env_with(preload: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VIRTUAL_ENV")}
    if preload:
        env["LD_PRELOAD"] = OPENBLAS
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_now() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (at a gate our own servers are idle: it is others' load)."""
    def snap():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


QUIET_WAIT = 180.0


def wait_quiet(max_wait: float | None = None, busy: float = 0.25) -> dict:
    """Before a measurement: wait (bounded) until other processes leave the CPU mostly idle."""
    max_wait = QUIET_WAIT if max_wait is None else max_wait
    t0 = time.perf_counter()
    while (b := cpu_busy()) > busy and time.perf_counter() - t0 < max_wait:
        time.sleep(2)
    return {"waited_s": round(time.perf_counter() - t0, 1), "others_busy": round(b, 2), "loadavg": load_now()}


class Server:
    """One OpenAI-compatible server subprocess; `start()` returns seconds until it answered ready."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, logdir: Path, model: str,
                 ready_path: str = "/health"):
        self.name, self.cmd, self.env, self.port, self.model = name, cmd, env, port, model
        self.ready_path = ready_path
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300, cwd: Path = ROOT) -> float:
        t0 = time.perf_counter()
        log = open(self.log_path, "ab")
        log.write(f"\n$ {shlex.join(self.cmd)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            if self.ready():
                return time.perf_counter() - t0
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} not ready within {timeout:.0f}s; see {self.log_path}")

    def ready(self) -> bool:
        try:
            r = httpx.get(self.url + self.ready_path, timeout=2)
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        if self.ready_path == "/v1/status":    # mlxd: every preloaded model's worker loaded
            models = r.json().get("models") or []
            return bool(models) and all(m.get("state") == "ready" for m in models if m.get("preload"))
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60, reap: bool = True) -> int | None:
        """`sig` to the server itself (mlxd drains, stops its workers and flushes its disk cache on
        SIGTERM), SIGKILL if it outlives `timeout`; then, if `reap`, SIGKILL what is left of its
        process group (a bench that checks for leaked workers passes reap=False). Its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if reap:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # stragglers (workers, engine threads)
            except (ProcessLookupError, PermissionError):
                pass
        return self.proc.returncode

    def status(self) -> dict:
        return httpx.get(self.url + "/v1/status", timeout=10).json()

    def model_status(self, name: str) -> dict:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def prepare_cache_dir(cache_dir: Path) -> Path:
    """An mlxd cache dir whose models/ is the tests' import, so no run pays for a second GGUF import."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    (MODELS_CACHE / "models").mkdir(parents=True, exist_ok=True)
    if not (cache_dir / "models").exists():
        (cache_dir / "models").symlink_to(MODELS_CACHE / "models")
    return cache_dir


def smol(name: str, **over) -> dict:
    """A model entry on the embedded SmolLM2 weights."""
    return {"name": name, "source": "embedded:smollm2", **over}


class Mlxd(Server):
    """`mlxd serve` on a config file the bench may rewrite (`write_config`, or its own text at
    `config_path`); ready once every preloaded model's worker is. `checkout` runs the daemon
    package of another git checkout (a baseline) with this venv."""

    def __init__(self, workdir: Path, models: list[dict], name: str = "mlxd", cache_dir: Path | None = None,
                 server: dict | None = None, checkout: Path | None = None, log_level: str = "warning"):
        self.cache_dir = prepare_cache_dir(cache_dir or workdir / f"{name}-cache")
        self.config_path = workdir / f"{name}.yaml"
        self.checkout = checkout or ROOT
        cmd = [sys.executable, "-m", "daemon", "serve", "--config", str(self.config_path), "--log-level", log_level]
        env = env_with(False)                    # workers preload OpenBLAS themselves
        env["PYTHONPATH"] = str(self.checkout)
        super().__init__(name, cmd, env, free_port(), workdir, models[0]["name"] if models else "",
                         ready_path="/v1/status")
        self.write_config(models, server)

    def write_config(self, models: list[dict], server: dict | None = None) -> None:
        cfg = {"server": {"host": "127.0.0.1", "port": self.port, "cache_dir": str(self.cache_dir), **(server or {})},
               "models": models}
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start(self, timeout: float = 300) -> float:
        return super().start(timeout, cwd=self.checkout)


def mlxd(workdir: Path, model_cfg: dict, name: str = "mlxd", cache_dir: Path | None = None,
         models: list[dict] | None = None, server: dict | None = None, checkout: Path | None = None) -> Mlxd:
    """An Mlxd on `model_cfg` as its one `smollm2` entry; `models` (each with its own name, on the
    embedded SmolLM2 unless it says otherwise) replaces that entry."""
    models = models or [{"name": "smollm2", **model_cfg}]
    return Mlxd(workdir, [{"source": "embedded:smollm2", **m} for m in models], name, cache_dir
                or workdir / "mlxd-cache", server, checkout)


def mlx_lm_server(workdir: Path, mdir: Path, preload: bool, name: str = "mlx_lm.server") -> Server:
    (Path.home() / ".cache/huggingface/hub").mkdir(parents=True, exist_ok=True)   # its /v1/models needs it
    port = free_port()
    cmd = [str(PEER_BIN["mlx-lm"] / "mlx_lm.server"), "--model", str(mdir), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "WARNING"]
    return Server(name, cmd, env_with(preload), port, workdir, "default_model")


def vllm_mlx_server(workdir: Path, mdir: Path, preload: bool = True, name: str = "vllm-mlx") -> Server:
    """vllm-mlx saves its prefix cache to ~/.cache/vllm-mlx on shutdown and loads it at start:
    HOME is pointed into the run's temp dir so runs do not feed each other (restarts within a run do)."""
    port = free_port()
    cmd = [str(PEER_BIN["vllm-mlx"] / "vllm-mlx"), "serve", str(mdir), "--continuous-batching",
           "--offline", "--host", "127.0.0.1", "--port", str(port)]
    env = env_with(preload)
    env["HOME"] = str(workdir / f"{name}-home")
    return Server(name, cmd, env, port, workdir, str(mdir))


def stream_chat(server: Server, messages: list[dict], max_tokens: int, timeout: float = 600,
                model: str | None = None, extra: dict | None = None) -> dict:
    """One greedy streamed chat completion (`extra` fields added to the body), timed per chunk that
    carries output: content, reasoning or tool-call deltas (SSE comments are skipped)."""
    body = {"model": model or server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    times, parts, usage, finish, kinds = [], [], None, None, []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=httpx.Timeout(timeout, connect=10)) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{server.name}: request ran past {timeout}s")
            if not line.startswith("data:"):
                continue                      # blank separators and ': prefill' keep-alives
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            usage = obj.get("usage") or usage
            for ch in obj.get("choices") or []:
                finish = ch.get("finish_reason") or finish
                delta = ch.get("delta") or {}
                kind = next((k for k in ("content", "reasoning_content", "reasoning", "tool_calls") if delta.get(k)),
                            None)
                if kind:
                    times.append(time.perf_counter())
                    kinds.append(kind)
                if content := delta.get("content"):
                    parts.append(content)
    n = (usage or {}).get("completion_tokens") or len(times)
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {
        "ttft": times[0] - t0 if times else None,
        "decode_tps": (n - 1) / (times[-1] - times[0]) if len(times) > 1 and n > 1 else None,
        "completion_tokens": n, "chunks": len(times),
        "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached_tokens": details.get("cached_tokens"),
        "total": time.perf_counter() - t0, "text": "".join(parts), "finish_reason": finish,
        "first_kind": kinds[0] if kinds else None, "tool_call_chunks": kinds.count("tool_calls"),
    }


def ttft_axes(title: str):
    """A figure for TTFT per step (log scale), or (None, None) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return None, None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_title(title)
    return fig, ax


def save_ttft_plot(fig, ax, x: list, xlabel: str, path: Path) -> None:
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time to first token (s, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


class InProc:
    """This script re-run as a long-lived subprocess (OpenBLAS preloaded) answering JSON requests
    line by line: in-process measurements then interleave with the servers' and share their noise."""

    def __init__(self, flag: str, payload: dict, logdir: Path, timeout: float = 300):
        self.log = open(logdir / f"{flag.strip('-')}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(sys.argv[0]).resolve()), flag, json.dumps(payload)],
                                     env=env_with(True), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.info = self._get(timeout)

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.lines.put(json.loads(line[2:]))
        self.lines.put(None)

    def _get(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"in-process worker gave no answer in {timeout:.0f}s") from None
        if msg is None:
            raise RuntimeError(f"in-process worker exited; see {self.log.name}")
        return msg

    def call(self, req: dict, timeout: float = 600) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._get(timeout)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_inproc(handler, setup: dict) -> None:
    """The child side of InProc: answer each stdin line with one '@@'-marked stdout line."""
    def say(obj):
        print("@@" + json.dumps(obj, default=str), flush=True)
    say(setup)
    for line in sys.stdin:
        say(handler(json.loads(line)))


def run_self(flag: str, payload: dict, preload: bool, timeout: float) -> dict:
    """Re-run this script in a fresh process (OpenBLAS preloaded or not) for an in-process measurement."""
    p = subprocess.run([sys.executable, str(Path(sys.argv[0]).resolve()), flag, json.dumps(payload)], env=env_with(preload),
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{flag} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def publish(name: str, res: dict, report, t_start: float, quick: bool) -> Path:
    """Close the run's record and write `name`.md (`report(res, command)`) and `name`.json into
    results/, or into a temp dir for a --quick smoke run (its numbers mean nothing); returns the dir."""
    res["load_end"] = load_now()
    res["seconds"] = time.perf_counter() - t_start
    res["command"] = f"cd {ROOT} && .venv/bin/python ops/bench/{name}.py" + (" --quick" if quick else "")
    md = report(res, res["command"])
    print(md)
    out = Path(tempfile.gettempdir()) / "mlxd-bench-quick" if quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(md)
    write_json(out / f"{name}.json", res)
    return out
