"""The ranks of a distributed model, seen from the daemon: addresses, ports, how each starts.

Rank 0 is the model's ordinary worker (the daemon's socketpair, the usual protocol); ranks
1..n-1 have no connection to the daemon. A rank on this machine is a child process started
with the two variables `mlx.launch` would set (MLX_RANK, MLX_HOSTFILE); a rank on another
host is started over ssh with the same script mlx.launch runs there. This module never
imports MLX, like the rest of the daemon.
"""

from __future__ import annotations

import ipaddress
import json
import random
import shlex
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .config import Distributed

REMOTE_PORTS = (32323, 60000)   # for ranks whose free ports we cannot see (mlx.launch starts at 32323)


@lru_cache(maxsize=64)
def is_local(ip: str) -> bool:
    """An address of this machine: loopback, or one we can bind."""
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False


def free_port(ip: str) -> int:
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class Plan:
    """Where every rank listens: the ring's hostfile and rank 0's doorbell."""
    hosts: tuple[str, ...]
    ports: tuple[int, ...]
    doorbell: str             # "ip:port" rank 0 listens on; the other ranks connect to it
    backend: str
    rdma: tuple = ()          # jaccl: each rank's RDMA device to each other rank

    @property
    def hostfile(self) -> str:
        """MLX_HOSTFILE's contents for the ring backend: one ["ip:port"] per rank."""
        return json.dumps([[_endpoint(h, p)] for h, p in zip(self.hosts, self.ports)])

    @property
    def files(self) -> dict[str, str]:
        """The variables that name a file, and that file's contents (as mlx.launch writes them)."""
        if self.backend == "ring":
            return {"MLX_HOSTFILE": self.hostfile}
        return {"MLX_IBV_DEVICES": json.dumps([list(r) for r in self.rdma])}

    def env(self, rank: int, paths: dict[str, str]) -> dict[str, str]:
        """Rank `rank`'s variables, with `paths` where this host holds `files`."""
        out = {"MLX_RANK": str(rank), **paths}
        if self.backend == "jaccl":    # rank 0 coordinates
            out["MLX_JACCL_COORDINATOR"] = _endpoint(self.hosts[0], self.ports[0])
        return out


def plan(dist: Distributed) -> Plan:
    """Ports for a fresh start of the group; hosts[0] must be this machine (rank 0 is our worker)."""
    if not is_local(dist.hosts[0]):
        raise ValueError(f"distributed.hosts[0] ({dist.hosts[0]}) is not an address of this machine: "
                         f"rank 0 runs in the daemon's worker, so the first host must be local")
    remote = [h for h in dist.hosts[1:] if not is_local(h)]
    if remote and ipaddress.ip_address(dist.hosts[0]).is_loopback:
        raise ValueError(f"distributed.hosts[0] is {dist.hosts[0]}, which {remote[0]} cannot reach: "
                         f"give this machine's address on the network the ranks share")
    # A random port on a remote host: a replacement group starts while the old one still holds its ports.
    ports = tuple(free_port(h) if is_local(h) else random.randrange(*REMOTE_PORTS) for h in dist.hosts)
    return Plan(dist.hosts, ports, _endpoint(dist.hosts[0], free_port(dist.hosts[0])), dist.backend,
                dist.rdma or ())


def check_reachable(host: str, timeout: float = 5.0, port: int = 22) -> None:
    """A remote rank's host answers on the ssh port; ValueError naming the host when it does not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        raise ValueError(f"distributed host {host} is unreachable over ssh (port {port}): "
                         f"{e.strerror or e or 'timed out'}") from None


def follower_args(rank: int, model_json: str, cache_dir: Path, doorbell: str, extra: list[str]) -> list[str]:
    return ["-m", "daemon.worker", "--rank", str(rank), "--doorbell", doorbell, "--model", model_json,
            "--cache-dir", str(cache_dir), *extra]


def secret_command(host: str) -> list[str]:
    """The ssh command that puts a group's secret (its stdin, no pty, so nothing echoes it) into
    a 0600 temp file on `host` and prints the file's path; the rank reads and removes it."""
    return ["ssh", "-o", "LogLevel=QUIET", "-o", "BatchMode=yes", host,
            "umask 077; f=$(mktemp) && cat > \"$f\" && printf '%s' \"$f\""]


def remote_command(host: str, rank: int, plan_: Plan, python: str, cwd: str, args: list[str],
                   env: dict[str, str] | None = None) -> list[str]:
    """The ssh command that starts one remote rank, as mlx.launch does it: the hostfile (or
    jaccl's device list) written to a temp file there, MLX_RANK exported, then exec. `-tt` ties the remote
    process to the connection: killing ssh (the daemon does, with the group) ends it."""
    script = "stty -echo 2>/dev/null; "
    script += f"cd {shlex.quote(cwd)} || exit 1; "
    for k, v in (env or {}).items():
        script += f"export {k}={shlex.quote(v)}; "
    for k, content in plan_.files.items():
        script += f"{k}=$(mktemp); printf '%s' {shlex.quote(content)} > \"${k}\"; export {k}; "
    for k, v in plan_.env(rank, {}).items():
        script += f"export {k}={shlex.quote(v)}; "
    script += "exec " + shlex.join([python, *args])
    return ["ssh", "-tt", "-o", "LogLevel=QUIET", "-o", "BatchMode=yes", host, script]
