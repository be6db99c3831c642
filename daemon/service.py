"""`mlxd service`: run the daemon as a launchd agent (macOS) or a systemd user unit (Linux).

Every outside effect (commands, file writes, HTTP, uid, platform, home) goes through a
`Runner`, so the launchctl and systemctl sequences can be recorded and tested anywhere,
and `--dry-run` is just a Runner that prints instead of acting.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import ConfigError, Server, load_config

LABEL = "com.mlxd.daemon"
UNIT = "mlxd.service"
THROTTLE = 10       # seconds between restarts after a crash
SERVER_GRACE = 5     # hypercorn's graceful_timeout (server.py)
STOP_MARGIN = 10     # process start-up, the last log lines, a loaded machine
PASS_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "XDG_CACHE_HOME")
DEFAULT_PATH = "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


class ServiceError(Exception):
    """A step that failed; the message says which command and why."""


class Runner:
    """The real world. Tests replace `run`/`get` with recorders and point `home` at a tmp dir."""

    def __init__(self, home=None, platform=None, uid=None, env=None):
        self.home = Path(home) if home else Path.home()
        self.platform = platform or sys.platform
        self.uid = os.getuid() if uid is None else uid
        self.env = dict(os.environ if env is None else env)

    def run(self, argv, capture=True) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=capture, text=True)
        except FileNotFoundError:
            return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")

    def write(self, path: Path, text: str) -> None:
        """Write via a temp file and rename, so launchd/systemd never read half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def get(self, url: str):
        """(status, body) of a GET; raises OSError when nothing answers."""
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def say(self, message: str) -> None:
        print(message)


class DryRun(Runner):
    """Says what would be written and run, and changes nothing."""

    def run(self, argv, capture=True):
        print(f"# dry run: would run: {shlex.join(argv)}")
        return subprocess.CompletedProcess(argv, 0, "", "")

    def write(self, path, text):
        print(f"# dry run: would write {path}")
        print(text.rstrip("\n"))

    def mkdir(self, path):
        print(f"# dry run: would create {path}/")

    def remove(self, path):
        print(f"# dry run: would remove {path}")

    def get(self, url):
        print(f"# dry run: would GET {url}")
        return None

    def sleep(self, seconds):
        pass

    def say(self, message):
        pass  # "installed ..." would be untrue


def program(config: Path) -> list[str]:
    """Absolute argv for `serve`: the venv's `mlxd` script, else this interpreter with -m."""
    mlxd = Path(sys.prefix) / "bin" / "mlxd"
    cmd = [str(mlxd)] if mlxd.exists() else [os.path.abspath(sys.executable), "-m", "daemon"]
    return cmd + ["serve", "--config", str(config)]


def environment(env: dict) -> dict:
    """What the service needs from the installing shell: a PATH that finds the venv first
    (absolute entries only: the service has another cwd) and where models live."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", DEFAULT_PATH).split(os.pathsep) if os.path.isabs(p)]
    out = {"PATH": os.pathsep.join(dict.fromkeys([venv_bin, *path]))}
    out.update({k: env[k] for k in PASS_ENV if env.get(k)})
    return out


def stop_timeout(server: Server) -> int:
    """Seconds the service manager waits after SIGTERM before SIGKILL: all of mlxd's own
    shutdown (in-flight requests get `shutdown_timeout`, then each worker `worker_stop_timeout`
    to flush its prefix cache, then the HTTP server's grace) and a margin. Shorter, and
    launchd/systemd would kill a busy daemon mid-flush and lose the cache writes."""
    return int(server.shutdown_timeout + server.worker_stop_timeout + SERVER_GRACE + STOP_MARGIN + 0.999)


def launchd_plist(argv: list[str], env: dict, workdir: Path, logs: Path, stop: int | None = None) -> dict:
    return {
        "Label": LABEL,
        "ProgramArguments": argv,
        "WorkingDirectory": str(workdir),
        "EnvironmentVariables": env,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
        "ThrottleInterval": THROTTLE,
        "ExitTimeOut": stop_timeout(Server()) if stop is None else stop,
        "ProcessType": "Interactive",  # no background throttling of GPU work
        "StandardOutPath": str(logs / "mlxd.out.log"),
        "StandardErrorPath": str(logs / "mlxd.err.log"),
    }


def _sd_word(s: str, exec_line: bool = False) -> str:
    """One word of a unit file line: systemd splits on spaces, expands % (and $ in Exec)."""
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if exec_line:
        s = s.replace("$", "$$")
    return f'"{s}"' if not s or re.search(r"[\s;'\"\\]", s) else s


def systemd_unit(argv: list[str], env: dict, workdir: Path, stop: int | None = None) -> str:
    stop = stop_timeout(Server()) if stop is None else stop
    environment = " ".join(_sd_word(f"{k}={v}") for k, v in env.items())
    return f"""\
[Unit]
Description=mlxd: MLX language models behind an OpenAI-compatible API

[Service]
Type=simple
ExecStart={" ".join(_sd_word(a, exec_line=True) for a in argv)}
WorkingDirectory={_sd_word(str(workdir))}
Environment={environment}
Restart=on-failure
RestartSec={THROTTLE}
KillSignal=SIGTERM
TimeoutStopSec={stop}

[Install]
WantedBy=default.target
"""


def _must(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if p.returncode != 0:
        why = (p.stderr or p.stdout or "").strip()
        raise ServiceError(f"`{shlex.join(p.args)}` failed ({p.returncode}): {why}")
    return p


def _health(r: Runner, config: Path) -> bool:
    try:
        server = load_config(config).server
    except ConfigError as e:
        print(f"health: not checked: {e}")
        return False
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}/health"
    try:
        res = r.get(url)
    except OSError as e:
        print(f"health: {url}: no answer ({getattr(e, 'reason', e)})")
        return False
    if res is None:
        return True
    code, body = res
    print(f"health: {url}: {code} {body.strip()}")
    return code == 200


class Launchd:
    """A per-user launch agent in the gui/<uid> domain (needs a logged-in user, as Metal does)."""

    def __init__(self, r: Runner):
        self.r = r
        self.path = r.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.log_dir = r.home / "Library" / "Logs" / "mlxd"
        self.domain = f"gui/{r.uid}"
        self.target = f"{self.domain}/{LABEL}"

    def _launchctl(self, modern: list[str], legacy: list[str]):
        """Run a launchctl subcommand, falling back to the pre-10.11 verb if it is unknown."""
        p = self.r.run(["launchctl", *modern])
        text = (p.stderr + p.stdout).lower()
        if p.returncode != 0 and any(w in text for w in ("unrecognized", "unknown subcommand", "usage:")):
            p = self.r.run(["launchctl", *legacy])
        return p

    def _bootstrap(self):
        return self._launchctl(["bootstrap", self.domain, str(self.path)], ["load", "-w", str(self.path)])

    def _bootout(self):
        return self._launchctl(["bootout", self.target], ["unload", str(self.path)])

    def install(self, argv, env, workdir, stop: int | None = None):
        self.r.mkdir(self.log_dir)  # launchd creates log files but not their directory
        plist = launchd_plist(argv, env, workdir, self.log_dir, stop)
        self.r.write(self.path, plistlib.dumps(plist).decode())
        self._bootout()  # a reinstall replaces the running definition; fails harmlessly if none
        for _ in range(3):  # bootstrap right after bootout can race with the teardown
            p = self._bootstrap()
            if p.returncode == 0:
                break
            self.r.sleep(1)
        _must(p)
        self.r.say(f"installed {self.path}; logs in {self.log_dir}")

    def uninstall(self):
        self._bootout()
        self.r.remove(self.path)
        self.r.say(f"removed {self.path} (logs kept in {self.log_dir})")

    def start(self):
        """Load it if stopped (RunAtLoad starts it), else restart it in place."""
        if not self.path.exists():
            raise ServiceError(f"{self.path} not found: run `mlxd service install` first")
        if self._bootstrap().returncode != 0:
            _must(self.r.run(["launchctl", "kickstart", "-k", self.target]))

    def stop(self):
        """Unload: nothing restarts it until `start`, `install` or the next login."""
        _must(self._bootout())

    def status(self) -> bool:
        p = self.r.run(["launchctl", "print", self.target])
        if p.returncode != 0:
            print(f"{self.target}: not loaded" + ("" if self.path.exists() else " (not installed)"))
            return False
        fields = re.findall(r"^\t(state|pid|runs|last exit code|last terminating signal) = (.*)$",
                            p.stdout, re.M)
        print(f"{self.target}: " + (", ".join(f"{k} = {v}" for k, v in fields) or "loaded"))
        return True

    def logs(self, lines: int, follow: bool):
        files = [str(self.log_dir / "mlxd.out.log"), str(self.log_dir / "mlxd.err.log")]
        return self.r.run(["tail", "-n", str(lines), *(["-F"] if follow else []), *files], capture=False)


class Systemd:
    """A systemd user unit; `loginctl enable-linger` keeps it running without a login."""

    def __init__(self, r: Runner):
        self.r = r
        config_home = Path(r.env.get("XDG_CONFIG_HOME") or r.home / ".config")
        self.path = config_home / "systemd" / "user" / UNIT

    def _systemctl(self, *args, capture=True):
        return self.r.run(["systemctl", "--user", *args], capture=capture)

    def install(self, argv, env, workdir, stop: int | None = None):
        self.r.write(self.path, systemd_unit(argv, env, workdir, stop))
        _must(self._systemctl("daemon-reload"))
        _must(self._systemctl("enable", UNIT))
        _must(self._systemctl("restart", UNIT))  # starts it, or applies a changed unit
        self.r.say(f"installed {self.path}; to keep it running after logout: loginctl enable-linger")

    def uninstall(self):
        self._systemctl("disable", "--now", UNIT)  # fails harmlessly when not installed
        self.r.remove(self.path)
        _must(self._systemctl("daemon-reload"))
        self.r.say(f"removed {self.path}")

    def start(self):
        """Restart if running, like launchd's kickstart -k, so both platforms mean the same."""
        _must(self._systemctl("restart", UNIT))

    def stop(self):
        _must(self._systemctl("stop", UNIT))

    def status(self) -> bool:
        return self._systemctl("status", UNIT, "--no-pager", capture=False).returncode == 0

    def logs(self, lines: int, follow: bool):
        return self.r.run(["journalctl", "--user", "-u", UNIT, "-n", str(lines), "--no-pager",
                           *(["-f"] if follow else [])], capture=False)


def manager(r: Runner):
    if r.platform == "darwin":
        return Launchd(r)
    if r.platform.startswith("linux"):
        return Systemd(r)
    raise ServiceError(f"no service manager support on {r.platform}: run `mlxd serve` yourself")


def cmd_service(args, r: Runner | None = None) -> int:
    r = r or (DryRun() if args.dry_run else Runner())
    config = args.config or Path(r.env.get("MLXD_CONFIG") or r.home / ".config" / "mlxd" / "config.yaml")
    config = Path(os.path.abspath(Path(config).expanduser()))
    try:
        m = manager(r)
        if args.action == "install":
            server = load_config(config).server  # a service that cannot read its config would only crash-loop
            m.install(program(config), environment(r.env), config.parent, stop_timeout(server))
        elif args.action == "status":
            loaded = m.status()
            healthy = _health(r, config)  # checked even when not loaded: it may run by hand
            return 0 if loaded and healthy else 3
        elif args.action == "logs":
            return m.logs(args.lines, args.follow).returncode
        else:
            getattr(m, args.action)()
    except ConfigError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 2
    except ServiceError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "service", help="run mlxd at login: launchd agent (macOS) or systemd user unit (Linux)",
        description="Install and control mlxd as a per-user service that starts at login and "
                    "restarts after a crash: a launchd agent on macOS, a systemd user unit on Linux.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path,
                        help="config the service serves (default: $MLXD_CONFIG or ~/.config/mlxd/config.yaml)")
    common.add_argument("--dry-run", action="store_true", help="print what would be written and run; change nothing")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in [("install", "write the service definition, enable it and (re)start it"),
                       ("uninstall", "stop the service and remove its definition (logs are kept)"),
                       ("start", "start the service, or restart it if running"),
                       ("stop", "stop the service until the next start, install or login"),
                       ("status", "service manager state and the daemon's /health (exit 3 if not healthy)"),
                       ("logs", "show the service's recent log lines")]:
        a = actions.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")
        if name == "logs":
            a.add_argument("-n", "--lines", type=int, default=100, help="how many lines (default: 100)")
            a.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(func=cmd_service)
