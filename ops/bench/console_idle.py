"""The daemon's CPU while one web console is open and idle, against no console at all.

mlxd with two models, idle; its own process's CPU time (/proc/<pid>/stat, utime + stime,
workers not included) over a window with no page open, then over the same window with one
headless chromium tab on `/`. Usage: python ops/bench/console_idle.py [--seconds 60]
Writes ops/bench/results/console_idle.json.
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
from common import RESULTS, cpu_seconds, env_with, mlxd  # noqa: E402


def window(pid: int, seconds: float) -> float:
    """Percent of one core used by `pid` over `seconds`."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = mlxd(Path(tmp), {}, models=[{"name": "smol-a"}, {"name": "smol-b"}])
        with server:
            server.start()
            pid = server.proc.pid
            time.sleep(5)
            without = window(pid, args.seconds)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"],
                                            env=env_with(False))
                page = browser.new_page()
                page.goto(server.url + "/")
                page.locator('article.model[data-model="smol-b"] .state').filter(has_text="ready").wait_for()
                time.sleep(5)
                with_console = window(pid, args.seconds)
                snapshots = page.evaluate("() => document.querySelector('#conn').textContent")
                browser.close()
    out = {"seconds": args.seconds, "daemon_cpu_percent_no_console": round(without, 3),
           "daemon_cpu_percent_one_idle_console": round(with_console, 3), "console_state": snapshots}
    print(json.dumps(out, indent=2))
    (RESULTS / "console_idle.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
