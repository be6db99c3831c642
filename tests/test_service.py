"""`mlxd service`: the generated plist and unit, and the launchctl/systemctl sequences.

Commands are recorded through the Runner seam with HOME in a tmp dir, so these run on any
OS and never touch the real ~/Library or ~/.config.
"""

from __future__ import annotations

import configparser
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import service
from daemon.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
UID = 501


class Recorder(service.Runner):
    """Records argv instead of running it; `replies` maps an argv prefix to (rc, stdout, stderr)."""

    def __init__(self, home: Path, platform: str, replies=None):
        super().__init__(home=home, platform=platform, uid=UID,
                         env={"PATH": "/usr/bin:relative:/bin", "HF_HOME": "/data/hf"})
        self.calls, self.urls, self.replies = [], [], replies or {}
        self.health = (200, '{"status": "ok"}')

    def run(self, argv, capture=True):
        self.calls.append(argv)
        for prefix, (rc, out, err) in self.replies.items():
            if tuple(argv[:len(prefix)]) == prefix:
                return subprocess.CompletedProcess(argv, rc, out, err)
        return subprocess.CompletedProcess(argv, 0, "", "")

    def get(self, url):
        self.urls.append(url)
        if isinstance(self.health, Exception):
            raise self.health
        return self.health

    def sleep(self, seconds):
        pass


def mlxd(r: service.Runner, *argv) -> int:
    return service.cmd_service(build_parser().parse_args(["service", *argv]), r)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "cfg" / "config.yaml"
    path.parent.mkdir()
    shutil.copy(ROOT / "config.example.yaml", path)
    return path


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


PLIST = f"Library/LaunchAgents/{service.LABEL}.plist"
TARGET = f"gui/{UID}/{service.LABEL}"
UNSUPPORTED = (1, "", "Unrecognized subcommand: bootstrap\nUsage: launchctl <subcommand> ...")


def test_plist_has_required_keys_with_absolute_paths(home, config):
    r = Recorder(home, "darwin")
    assert mlxd(r, "install", "--config", str(config)) == 0
    with open(home / PLIST, "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "com.mlxd.daemon"
    argv = plist["ProgramArguments"]
    assert os.path.isabs(argv[0]) and os.path.exists(argv[0])
    assert argv[-3:] == ["serve", "--config", str(config)] and os.path.isabs(argv[-1])
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] > 0 and plist["ExitTimeOut"] > 30
    assert plist["ProcessType"] == "Interactive"
    logs = home / "Library" / "Logs" / "mlxd"
    assert logs.is_dir()
    assert Path(plist["StandardOutPath"]).parent == logs == Path(plist["StandardErrorPath"]).parent
    assert plist["WorkingDirectory"] == str(config.parent)
    env = plist["EnvironmentVariables"]
    assert env["HF_HOME"] == "/data/hf"
    path = env["PATH"].split(":")
    assert path[0] == str(Path(sys.prefix) / "bin") and "relative" not in path and "/usr/bin" in path


def test_launchctl_sequence(home, config):
    r = Recorder(home, "darwin")
    plist = str(home / PLIST)
    assert mlxd(r, "install", "--config", str(config)) == 0
    assert mlxd(r, "stop") == 0
    assert mlxd(r, "start") == 0
    assert mlxd(r, "uninstall") == 0
    assert r.calls == [
        ["launchctl", "bootout", TARGET],
        ["launchctl", "bootstrap", f"gui/{UID}", plist],
        ["launchctl", "bootout", TARGET],
        ["launchctl", "bootstrap", f"gui/{UID}", plist],
        ["launchctl", "bootout", TARGET],
    ]
    assert not (home / PLIST).exists()


def test_launchctl_start_restarts_a_loaded_service(home, config):
    r = Recorder(home, "darwin", {("launchctl", "bootstrap"): (5, "", "Bootstrap failed: 5: Input/output error")})
    r.write(home / PLIST, "")
    assert mlxd(r, "start") == 0
    assert r.calls[-1] == ["launchctl", "kickstart", "-k", TARGET]


def test_launchctl_falls_back_to_load_before_bootstrap_existed(home, config):
    r = Recorder(home, "darwin", {("launchctl", "bootstrap"): UNSUPPORTED,
                                  ("launchctl", "bootout"): UNSUPPORTED})
    plist = str(home / PLIST)
    assert mlxd(r, "install", "--config", str(config)) == 0
    assert mlxd(r, "uninstall") == 0
    assert r.calls == [
        ["launchctl", "bootout", TARGET],
        ["launchctl", "unload", plist],
        ["launchctl", "bootstrap", f"gui/{UID}", plist],
        ["launchctl", "load", "-w", plist],
        ["launchctl", "bootout", TARGET],
        ["launchctl", "unload", plist],
    ]


def test_launchctl_bootstrap_failure_is_reported(home, config, capsys):
    r = Recorder(home, "darwin", {("launchctl", "bootstrap"): (5, "", "Bootstrap failed: 5: Input/output error")})
    assert mlxd(r, "install", "--config", str(config)) == 1
    assert [c[1] for c in r.calls].count("bootstrap") == 3  # retried: it can race the bootout
    assert "Input/output error" in capsys.readouterr().err


def test_launchctl_status_summarises_and_checks_health(home, config, capsys):
    printed = f"{TARGET} = {{\n\tactive count = 1\n\tstate = running\n\tpid = 4242\n\truns = 1\n" \
              f"\tlast exit code = (never exited)\n\tendpoints = {{\n\t\tstate = nested\n\t}}\n}}\n"
    r = Recorder(home, "darwin", {("launchctl", "print"): (0, printed, "")})
    assert mlxd(r, "status", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "state = running, pid = 4242, runs = 1, last exit code = (never exited)" in out
    assert r.urls == ["http://127.0.0.1:8000/health"]
    r.health = (503, '{"status": "starting"}')
    assert mlxd(r, "status", "--config", str(config)) == 3
    r.health = ConnectionRefusedError("refused")
    assert mlxd(r, "status", "--config", str(config)) == 3
    assert "no answer" in capsys.readouterr().out


def test_launchctl_logs_tail_both_files(home):
    r = Recorder(home, "darwin")
    assert mlxd(r, "logs", "-n", "20", "-f") == 0
    logs = home / "Library" / "Logs" / "mlxd"
    assert r.calls == [["tail", "-n", "20", "-F", str(logs / "mlxd.out.log"), str(logs / "mlxd.err.log")]]


def test_systemd_sequence(home, config):
    r = Recorder(home, "linux")
    assert mlxd(r, "install", "--config", str(config)) == 0
    assert (home / ".config/systemd/user/mlxd.service").exists()
    for action in ("stop", "start", "status", "logs", "uninstall"):
        mlxd(r, action, "--config", str(config))
    sc = ["systemctl", "--user"]
    assert r.calls == [
        sc + ["daemon-reload"], sc + ["enable", "mlxd.service"], sc + ["restart", "mlxd.service"],
        sc + ["stop", "mlxd.service"],
        sc + ["restart", "mlxd.service"],
        sc + ["status", "mlxd.service", "--no-pager"],
        ["journalctl", "--user", "-u", "mlxd.service", "-n", "100", "--no-pager"],
        sc + ["disable", "--now", "mlxd.service"], sc + ["daemon-reload"],
    ]
    assert not (home / ".config/systemd/user/mlxd.service").exists()


def test_systemd_failure_stops_the_sequence(home, config, capsys):
    r = Recorder(home, "linux", {("systemctl", "--user", "enable"): (1, "", "Failed to connect to bus")})
    assert mlxd(r, "install", "--config", str(config)) == 1
    assert r.calls[-1] == ["systemctl", "--user", "enable", "mlxd.service"]
    assert "Failed to connect to bus" in capsys.readouterr().err


def test_install_refuses_a_bad_config(home, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: []\n")
    r = Recorder(home, "darwin")
    assert mlxd(r, "install", "--config", str(bad)) == 2
    assert r.calls == [] and not home.exists()


def test_dry_run_changes_nothing(home, config, capsys):
    r = service.DryRun(home=home, platform="darwin", uid=UID, env={"PATH": "/usr/bin"})
    assert mlxd(r, "install", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert f"would run: launchctl bootstrap gui/{UID} {home / PLIST}" in out
    plist = plistlib.loads(out.split(f"would write {home / PLIST}\n")[1].split("# dry run")[0].encode())
    assert plist["Label"] == service.LABEL
    assert not home.exists()


def test_unit_quotes_awkward_paths(tmp_path):
    config = tmp_path / "my models 100%" / "config.yaml"
    unit = service.systemd_unit(service.program(config), {"PATH": "/a b:/c", "HF_HOME": "/x$y"}, config.parent)
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(unit)
    exec_start = [w.replace("%%", "%") for w in shlex.split(cp["Service"]["ExecStart"])]
    assert exec_start[-1] == str(config)
    env = [w.replace("%%", "%") for w in shlex.split(cp["Service"]["Environment"])]
    assert env == ["PATH=/a b:/c", "HF_HOME=/x$y"]


def test_example_plist_is_current():
    """launchd/com.mlxd.daemon.plist.example is what the code renders for a sample user."""
    home = Path("/Users/you")
    argv = [str(home / "mlxd/.venv/bin/mlxd"), "serve", "--config", str(home / ".config/mlxd/config.yaml")]
    env = {"PATH": f"{home}/mlxd/.venv/bin:/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
           "HF_HOME": f"{home}/.cache/huggingface"}
    plist = service.launchd_plist(argv, env, home / ".config/mlxd", home / "Library/Logs/mlxd")
    assert (ROOT / "launchd" / "com.mlxd.daemon.plist.example").read_bytes() == plistlib.dumps(plist)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd units are generated on Linux")
def test_cli_dry_run_prints_a_valid_unit(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CONFIG_HOME", "MLXD_CONFIG")}
    p = subprocess.run([sys.executable, "-m", "daemon", "service", "install", "--dry-run",
                        "--config", "config.example.yaml"],
                       cwd=ROOT, env={**env, "HOME": str(home)}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    unit_path = home / ".config/systemd/user/mlxd.service"
    _, rest = p.stdout.split(f"# dry run: would write {unit_path}\n")
    unit = rest.split("# dry run:")[0]
    assert "would run: systemctl --user daemon-reload" in rest
    assert not home.exists()

    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str
    cp.read_string(unit)
    assert set(cp.sections()) == {"Unit", "Service", "Install"}
    s = cp["Service"]
    exec_start = shlex.split(s["ExecStart"])
    assert os.path.isabs(exec_start[0]) and os.path.exists(exec_start[0])
    assert exec_start[-2:] == ["--config", str(ROOT / "config.example.yaml")]
    assert s["Type"] == "simple" and s["Restart"] == "on-failure"
    assert {"RestartSec", "KillSignal", "TimeoutStopSec", "Environment", "WorkingDirectory"} <= set(s)
    assert cp["Install"]["WantedBy"] == "default.target"

    if shutil.which("systemd-analyze"):
        (tmp_path / "mlxd.service").write_text(unit)
        v = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "mlxd.service")],
                           capture_output=True, text=True)
        assert v.returncode == 0 and "mlxd.service" not in v.stderr, v.stderr


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_the_stop_timeout_covers_mlxds_own_shutdown_as_configured(home, config, platform):
    """launchd's ExitTimeOut / systemd's TimeoutStopSec outlast the drain, every worker's cache
    flush and the server's grace, so a busy daemon is never killed mid-flush."""
    config.write_text(config.read_text().replace("server:", "server:\n  shutdown_timeout: 100\n"
                                                 "  worker_stop_timeout: 200", 1))
    server = service.load_config(config).server
    assert (server.shutdown_timeout, server.worker_stop_timeout) == (100, 200)
    r = Recorder(home, platform)
    assert mlxd(r, "install", "--config", str(config)) == 0
    if platform == "darwin":
        stop = plistlib.loads((home / "Library/LaunchAgents/com.mlxd.daemon.plist").read_bytes())["ExitTimeOut"]
    else:
        unit = (home / ".config/systemd/user/mlxd.service").read_text()
        stop = int(unit.split("TimeoutStopSec=")[1].split()[0])
    assert stop >= 100 + 200 + service.SERVER_GRACE
