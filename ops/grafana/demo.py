"""Produce docs/dashboard.png from real data: start the daemon on the embedded model (two
models, as the tests do) and a Prometheus scraping it every second, send mixed traffic for a
few minutes, then render_panels. The second half of the traffic is mostly fresh prompts, so
the hit-rate panel shows the cache at work and then not.

    python ops/grafana/demo.py --seconds 150
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(Path(__file__).parent)]
from conftest import Daemon, free_port, smol  # noqa: E402
from render_panels import render  # noqa: E402

SYSTEM = ("You are a concise assistant for a small travel agency. Answer in one or two short "
          "sentences, name concrete places, and never invent prices or opening hours. ") * 3
TOPICS = ["Paris", "Rome", "Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Quebec"]


def traffic(url: str, model: str, until: float, switch: float, seed: int) -> None:
    """Multi-turn chats on a shared system prompt (prefix hits), later mostly one-off prompts
    (a random first line, a single turn: nothing to reuse)."""
    rnd, c = random.Random(seed), httpx.Client(base_url=url, timeout=300)
    while time.time() < until:
        fresh = rnd.random() < (0.2 if time.time() < switch else 0.9)
        system = f"{rnd.random()} {SYSTEM}" if fresh else SYSTEM
        msgs = [{"role": "system", "content": system}]
        for turn in range(1 if fresh else rnd.randint(1, 3)):
            msgs.append({"role": "user", "content": f"What should I see in {rnd.choice(TOPICS)}, day {turn + 1}?"})
            r = c.post("/v1/chat/completions", json={"model": model, "messages": msgs,
                                                     "max_tokens": rnd.randint(8, 40), "temperature": 0.7})
            msgs.append(r.json()["choices"][0]["message"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlxd-demo-"))
    d = Daemon(tmp, [smol("smol-a", engine={"max_batch_size": 8}), smol("smol-b", engine={"max_batch_size": 4})])
    port = free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "mlxd", "static_configs": [{"targets": [f"127.0.0.1:{d.port}"]}]}]}))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        d.start()
        t0 = time.time()
        until, switch = t0 + a.seconds, t0 + a.seconds / 2
        threads = [threading.Thread(target=traffic, args=(d.url, m, until, switch, i))
                   for i, m in enumerate(["smol-a", "smol-a", "smol-b", "smol-a", "smol-b"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(3)
        render(f"http://127.0.0.1:{port}", (time.time() - t0) / 60 + 0.5, a.out, window="30s")
        print(a.out)
    finally:
        prom.terminate()
        d.stop()
        prom.wait()


if __name__ == "__main__":
    main()
