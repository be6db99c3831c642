"""The monitoring kit in ops/ against the real daemon: a real Prometheus scrapes it, promtool
lints its exposition and the rules, and every metric the dashboard and alerts use exists.

Prometheus and promtool come from Debian's `prometheus` package (ops/setup.sh --test); on
Linux a missing binary fails the tests rather than skipping them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, free_port
from daemon.metrics import LATENCY

OPS = ROOT / "ops"
DASHBOARD = OPS / "grafana" / "mlxd-dashboard.json"
ALERTS = OPS / "prometheus" / "alerts.yml"
MODELS = ("smol-a", "smol-b")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if sys.platform != "linux":
            pytest.skip(f"{name} not installed (on Linux, ops/setup.sh --test installs Debian's prometheus)")
        pytest.fail(f"{name} not on PATH: run ops/setup.sh --test (apt-get install prometheus)")
    return path


def chat(client, n: int = 2) -> None:
    for i in range(n):
        for m in MODELS:
            client.chat.completions.create(model=m, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": f"Count to {i + 3}."}])


@pytest.fixture(scope="module")
def exposition(two_model_daemon, client) -> str:
    """/metrics after traffic to both models, so every per-request series exists."""
    chat(client, 1)
    return httpx.get(f"{two_model_daemon.url}/metrics", timeout=10).text


@pytest.fixture(scope="module")
def prom(two_model_daemon, tmp_path_factory):
    """A Prometheus server scraping the daemon every second; yields its base URL."""
    exe = binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "mlxd", "static_configs": [
            {"targets": [two_model_daemon.url.removeprefix("http://")]}]}]}))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        # Ready once the daemon has been scraped, so later traffic shows up as a rate.
        wait_for(lambda: scraped(url), 120, "first scrape",
                 lambda: (tmp / "prometheus.log").read_text(errors="replace")[-2000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def scraped(url: str) -> bool:
    try:
        return bool(query(url, 'up{job="mlxd"} == 1'))
    except (httpx.TransportError, ValueError):  # still starting: refused, or a 503 page that is not JSON
        return False


def query(url: str, expr: str) -> list:
    """The result of an instant query; fails on a PromQL error."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_for(check, timeout: float, what: str, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout}s\n{details()}")


def exprs() -> list[str]:
    """Every PromQL expression of the dashboard (panels, variables) and of the alert rules."""
    dash = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    out += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    out += [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return out


def test_prometheus_scrapes_both_models(prom, client, two_model_daemon):
    chat(client)
    series = wait_for(lambda: {s["metric"]["model"] for s in query(prom, "mlxd_prompt_tokens_total")} >= set(MODELS),
                      60, "mlxd_prompt_tokens_total for both models")
    assert series
    for m in MODELS:
        q = f'histogram_quantile(0.95, sum by (le) (rate(mlxd_time_to_first_token_seconds_bucket{{model="{m}"}}[30s])))'
        val = wait_for(lambda: [v for s in query(prom, q) if math.isfinite(v := float(s["value"][1]))], 60, q)[0]
        # The quantile interpolates inside the bucket its rank falls in, which holds one of the
        # requests: the bucket of a TTFT the request log reports (printed to the millisecond).
        ttfts = [float(t) for t in re.findall(rf"mlxd\.requests: {m}: .* TTFT ([0-9.]+)s", two_model_daemon.tail(10**7))]
        assert ttfts
        assert any(bucket(t - 0.0005)[0] <= val <= bucket(t + 0.0005)[1] for t in ttfts), (val, ttfts)


def bucket(seconds: float) -> tuple[float, float]:
    """(lower, upper] edges of the latency histogram's bucket that counts `seconds`."""
    edges = [0.0, *LATENCY, math.inf]
    hi = next(i for i in range(1, len(edges)) if seconds <= edges[i])
    return edges[hi - 1], edges[hi]


def test_dashboard_and_alert_queries_run_in_prometheus(prom):
    """Each expression, with Grafana's variables filled in, parses and evaluates."""
    for e in exprs():
        e = e.replace("label_values(mlxd_model_state, model)", "mlxd_model_state")
        query(prom, e.replace("$__rate_interval", "1m").replace("$model", ".*"))


def test_promtool_lints_live_exposition(exposition):
    r = subprocess.run([binary("promtool"), "check", "metrics"], input=exposition,
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout.strip(), r.stderr.strip()) == (0, "", "")


@pytest.mark.parametrize("args", [
    ["check", "rules", "ops/prometheus/alerts.yml"],
    ["check", "config", "ops/prometheus/prometheus.yml"],
    ["test", "rules", "ops/prometheus/alerts_test.yml"],
])
def test_promtool_checks_ops_files(args):
    r = subprocess.run([binary("promtool"), *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_and_alerts_use_exposed_metrics(exposition):
    """Names are compared exactly against the exposition's sample names (so `_bucket` on a
    histogram, `_total` on a counter). A labelled counter has no sample before its first
    increment (worker restarts, config reloads, errors), so a family declared by its
    `# TYPE` line counts with the sample names it will have."""
    exposed = set()
    for fam in text_string_to_metric_families(exposition):
        exposed |= {s.name for s in fam.samples}
        exposed |= {"counter": {fam.name + "_total"}, "gauge": {fam.name},
                    "histogram": {fam.name + s for s in ("_bucket", "_sum", "_count")}}.get(fam.type, set())
    used = {n for e in exprs() for n in re.findall(r"\bmlxd_[A-Za-z0-9_]*", e)}
    assert len(used) > 10
    assert sorted(used - exposed) == []
