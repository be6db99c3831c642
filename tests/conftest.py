"""Fixtures that run the real daemon, with real worker processes, on the real model.

Converted models are kept in `.cache/test/models` (git-ignored) across runs so only the
first run pays for the GGUF import; prefix caches are fresh per daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = ROOT / ".cache" / "test"      # resolve_model(cache_dir=TEST_CACHE) shares the imports
MODELS_CACHE = TEST_CACHE / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A `mlxd serve` subprocess on a config file the test may rewrite."""

    def __init__(self, tmp: Path, models: list[dict], server: dict | None = None, api_key: str | None = None):
        self.tmp, self.api_key = tmp, api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.cache_dir = tmp / "cache"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        MODELS_CACHE.mkdir(parents=True, exist_ok=True)
        if not (self.cache_dir / "models").exists():
            (self.cache_dir / "models").symlink_to(MODELS_CACHE)
        self.port = free_port()
        self.config_path = tmp / "config.yaml"
        self.write_config(models, server)
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, models: list[dict], server: dict | None = None) -> None:
        cfg = {"server": {"port": self.port, "cache_dir": str(self.cache_dir), **(server or {})}, "models": models}
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start(self, timeout: float = 300) -> "Daemon":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(self.config_path)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(signal.SIGKILL)     # a daemon that did not come up must not outlive the test
            raise
        return self

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                last = httpx.get(f"{self.url}/v1/status", headers=self.headers, timeout=5).json()
                if last["models"] and all(m["state"] == "ready" for m in last["models"]):
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"daemon not ready in {timeout}s: {last}\n{self.tail()}")

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/status", headers=self.headers, timeout=10).json()

    def model_status(self, name: str) -> dict:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def openai(self, timeout: float = 300):
        """The official client on this daemon, without retries (a retry would hide a failure)."""
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=timeout)

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 120) -> dict:
        """Until the model is ready again in a new worker process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.model_status(name)
            if st["state"] == "ready" and st["pid"] not in (None, old_pid):
                return st
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not come back: {st}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()



class OnDemandDaemon(Daemon):
    """Up once /health answers: its models load on demand, so none is `ready` at start."""

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                return httpx.get(f"{self.url}/health", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(self.tail())


def alive(pid: int) -> bool:
    """Whether a process with this pid still exists (a test's view of a worker or rank)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(pred, timeout: float, what):
    """pred()'s first truthy value, polled; `what` (or what() for a late detail) names the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := pred()):
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what() if callable(what) else what}")


SMOL_B_CONTEXT = 512      # two_model_daemon's smol-b: small, so a test reaches its end cheaply


def in_order(text: str, *lines: str) -> bool:
    """Whether each of `lines` occurs in `text`, each after the one before it."""
    at = 0
    for line in lines:
        at = text.find(line, at)
        if at < 0:
            return False
        at += len(line)
    return True


def smol(name: str, **over) -> dict:
    m = {"name": name, "source": "embedded:smollm2"}
    m.update(over)
    return m


@pytest.fixture(scope="session")
def two_model_daemon(tmp_path_factory):
    """Two models from the same weights with different settings, as a user might run them."""
    with Daemon(tmp_path_factory.mktemp("daemon"), [
        smol("smol-a", aliases=["default", "smol"], engine={"max_batch_size": 8},
             sampling={"temperature": 0.0, "max_tokens": 64}),
        smol("smol-b", engine={"max_batch_size": 4, "prefill_step_size": 256, "context_length": SMOL_B_CONTEXT},
             sampling={"temperature": 0.0, "max_tokens": 48}),
    ]) as d:
        yield d


@pytest.fixture(scope="session")
def client(two_model_daemon):
    return two_model_daemon.openai()
