"""The short soak: a minute of chaos against the real daemon, and not one invariant broken.

Every fault kind of `ops/bench/soak.py` is injected (a tmpfs cache dir when `mount` works,
else a plain one and no fill); the control model must answer everything, greedy cache
hits must match their cold answers, and nothing may be left behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ops" / "bench"))
from soak import Plan, Soak, markdown  # noqa: E402


def test_short_soak_breaks_no_invariant(tmp_path):
    plan = Plan(duration=60, seed=1, chaos_every=(1.5, 4.0), hang_timeout=15, tmpfs_mib=192)
    summary = Soak(plan, tmp_path / "soak").execute()
    report = markdown(summary, "tests/test_soak.py")
    (tmp_path / "soak.json").write_text(json.dumps(summary, indent=1))
    print(report)
    injected = summary["faults_injected"]
    assert summary["faults_total"] >= 10 and len(injected) >= 7, report
    assert {"yaml_change", "yaml_break", "sighup", "sigkill", "sigstop"} <= set(injected), report
    assert summary["by_model"]["soak-ctl"].get("ok", 0) >= 5, report
    assert summary["greedy"].get("identical_cache_hit", 0) >= 1, report
    assert summary["violations"] == [], report
