"""The short soak: a minute of chaos against the real daemon, and not one invariant broken.

Every fault kind of `ops/bench/soak.py` is injected, the disk-full one (fill) on a tmpfs cache
dir wherever a tmpfs mounts (as root); where it does not, the test says so in a warning. The
control model must answer everything, greedy cache hits must match their cold answers, and
nothing may be left behind.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ops" / "bench"))
from soak import Plan, Soak, error_outcome, log_findings, markdown, mount_tmpfs, unmount  # noqa: E402


def tmpfs_refused(tmp_path: Path) -> str | None:
    """Why a tmpfs does not mount here (no root, a container), or None: asked apart from the soak,
    so a soak that skips the fill fault where it could run fails."""
    probe = tmp_path / "tmpfs-probe"
    probe.mkdir()
    why = mount_tmpfs(probe, 1)
    if why is None:
        unmount(probe)
    return why


def test_short_soak_breaks_no_invariant(tmp_path):
    refused = tmpfs_refused(tmp_path)
    plan = Plan(duration=60, seed=1, chaos_every=(1.5, 4.0), hang_timeout=15, tmpfs_mib=192)
    summary = Soak(plan, tmp_path / "soak").execute()
    report = markdown(summary, "tests/test_soak.py")
    (tmp_path / "soak.json").write_text(json.dumps(summary, indent=1))
    print(report)
    injected = summary["faults_injected"]
    assert summary["faults_total"] >= 10 and len(injected) >= 7, report
    assert {"yaml_change", "yaml_break", "sighup", "sigkill", "sigstop"} <= set(injected), report
    if refused is None:
        assert "fill" in injected and summary["faults_unavailable"] == {}, report
    else:
        assert "fill" not in injected and "fill" in summary["faults_unavailable"], report
        warnings.warn(f"the soak's disk-full fault (fill) did not run: a tmpfs does not mount here ({refused})")
    # The untouched control model kept answering through the chaos; how many answers fit in the
    # minute is the machine's speed (1-2 at a load of 40 on 2 cores), so one is the behaviour.
    assert summary["by_model"]["soak-ctl"].get("ok", 0) >= 1, report
    assert summary["greedy"].get("identical_cache_hit", 0) >= 1, report
    assert summary["violations"] == [], report


def test_soak_judges_errors_and_logs(tmp_path):
    """The checks themselves: what counts as a clear error, and what in the log is a finding."""
    ok = '{"error": {"message": "The model \'x\' does not exist", "type": "invalid_request_error", "code": "model_not_found"}}'
    assert error_outcome(ok, 404) == {"outcome": "error", "code": "model_not_found",
                                      "detail": "The model 'x' does not exist"}
    assert error_outcome('{"error": {"message": "internal error: KeyError", "type": "server_error"}}', 500)["outcome"] \
        == "internal_error"
    for bad in ("<html>Bad Gateway</html>", '{"detail": "no"}', '{"error": "text"}', '{"error": {"message": ""}}'):
        assert error_outcome(bad, 502)["outcome"] == "bad_error"
    log = tmp_path / "daemon.log"
    log.write_text(
        "2026-11-25 12:00:00,000 ERROR mlxd.supervisor: the worker for model 'a' was killed by SIGKILL; restarting it\n"
        "2026-11-25 12:00:01,000 ERROR mlxd.supervisor: the worker for model 'a' hung (no progress for 16s) and was restarted\n"
        "2026-11-25 12:00:02,000 ERROR mlxd.supervisor: the worker for model 'b' exited with status 1; restarting it\n"
        "2026-11-25 12:00:03,000 ERROR asyncio: Task exception was never retrieved\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "KeyError: 'k'\n"
        "2026-11-25 12:00:04,000 ERROR mlxd.supervisor: the worker for model 'c' was killed by SIGSEGV\n")
    found = [(f["invariant"], f["detail"]) for f in log_findings(log)]
    assert found == [
        ("workers_die_only_by_injected_faults", "model 'b': the worker for model 'b' exited with status 1"),
        ("no_unhandled_exceptions", "traceback ending in KeyError: 'k'"),
        ("workers_die_only_by_injected_faults", "model 'c': the worker for model 'c' was killed by SIGSEGV"),
    ]
