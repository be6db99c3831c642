"""Render the dashboard's key panels to a PNG from a Prometheus HTTP API, for docs and
reports where no Grafana runs: TTFT p50/p95, tokens/s and prefix-cache hit rate per model.

    python ops/grafana/render_panels.py --prometheus http://127.0.0.1:9090 --minutes 30

Needs matplotlib (not a dependency of mlxd: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime

import httpx


def panels(w: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(title, unit, [(PromQL, legend suffix)]) per panel; `w` is the rate window."""
    ttft = "sum by (model, le) (rate(mlxd_time_to_first_token_seconds_bucket[{w}]))".format(w=w)
    hits, queries = (f"sum by (model) (rate(mlxd_prefix_cache_{n}_total[{w}]))" for n in ("hits", "queries"))
    return [
        ("Time to first token", "seconds", [(f"histogram_quantile(0.5, {ttft})", "p50"),
                                           (f"histogram_quantile(0.95, {ttft})", "p95")]),
        ("Generated tokens/s", "tokens/s", [(f"sum by (model) (rate(mlxd_generation_tokens_total[{w}]))", "")]),
        ("Prompt tokens/s", "tokens/s", [(f"sum by (model) (rate(mlxd_prompt_tokens_total[{w}]))", "")]),
        ("Prefix-cache hit rate (tokens)", "hit tokens / prompt tokens", [(f"{hits} / {queries}", "")]),
    ]


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query_range", timeout=30,
                  params={"query": expr, "start": start, "end": end, "step": step})
    r.raise_for_status()
    return r.json()["data"]["result"]


def render(url: str, minutes: float, out: str, window: str = "1m") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    end = time.time()
    start, step = end - minutes * 60, max(1.0, minutes * 60 / 300)
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), sharex=True)
    for ax, (title, unit, targets) in zip(axes.flat, panels(window)):
        for expr, suffix in targets:
            for s in sorted(query_range(url, expr, start, end, step), key=lambda s: s["metric"].get("model", "")):
                xs = [datetime.fromtimestamp(float(t)) for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]  # "NaN" where there was no traffic: a gap
                ax.plot(xs, ys, label=f'{s["metric"].get("model", "")} {suffix}'.strip(),
                        linestyle="--" if suffix == "p50" else "-")
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    fig.suptitle(f"mlxd, last {minutes:.1f} minutes (rates over {window})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--window", default="1m", help="rate() window")
    ap.add_argument("--out", default="docs/dashboard.png")
    a = ap.parse_args()
    render(a.prometheus, a.minutes, a.out, a.window)
    print(a.out)


if __name__ == "__main__":
    main()
