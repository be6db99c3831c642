"""A group's ranks trust only what proves the group's secret: the step broadcast and the doorbell.

The wire format is pure logic (unit tests); the doorbell runs over real TCP sockets with the
real `Bells` and `Bell`.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading

import pytest

from daemon import ranks
from daemon.worker.group import Bell, Bells
from daemon.worker.transport import (Opener, Sealer, TransportError, follower_handshake, leader_handshake,
                                     new_secret, secret_from_env)

SECRET = new_secret().encode()
OPS = [["insert", 0, [1, 2, 3], 0, None, 16, [0.7, 1.0, 42, 0], None], ["step"]]


def test_a_sealed_step_opens_in_order():
    sealer, opener = Sealer(SECRET), Opener(SECRET)
    assert opener.open(sealer.seal(OPS)) == OPS
    assert opener.open(sealer.seal([["step"]])) == [["step"]]


def test_a_pickle_is_refused():
    with pytest.raises(TransportError, match="magic"):
        Opener(SECRET).open(pickle.dumps(OPS))


def test_a_tampered_message_is_refused():
    data = bytearray(Sealer(SECRET).seal(OPS))
    data[-3] ^= 0x01                                   # one bit of the JSON
    with pytest.raises(TransportError, match="signature"):
        Opener(SECRET).open(bytes(data))
    head = bytearray(Sealer(SECRET).seal(OPS))
    head[12] ^= 0x01                                   # the sequence number, the tag left as it was
    with pytest.raises(TransportError, match="signature"):
        Opener(SECRET).open(bytes(head))


def test_a_message_under_another_secret_is_refused():
    with pytest.raises(TransportError, match="signature"):
        Opener(SECRET).open(Sealer(new_secret().encode()).seal(OPS))


def test_replayed_and_out_of_order_messages_are_refused():
    sealer, opener = Sealer(SECRET), Opener(SECRET)
    first, second, third = sealer.seal(OPS), sealer.seal([["step"]]), sealer.seal([["clear"]])
    opener.open(first)
    with pytest.raises(TransportError, match="out of order"):
        opener.open(first)                             # replayed
    with pytest.raises(TransportError, match="out of order"):
        opener.open(third)                             # one skipped
    assert opener.open(second) == [["step"]]           # a refused message changes nothing


def test_short_and_foreign_version_messages_are_refused():
    with pytest.raises(TransportError, match="too short"):
        Opener(SECRET).open(b"MLXG")
    data = bytearray(Sealer(SECRET).seal(OPS))
    data[4] = 9
    with pytest.raises(TransportError, match="version 9"):
        Opener(SECRET).open(bytes(data))


def test_the_secret_comes_from_the_environment_or_a_file_and_is_removed(tmp_path):
    env = {"MLXD_GROUP_SECRET": "abc"}
    assert secret_from_env(env) == b"abc" and env == {}
    path = tmp_path / "s"
    path.write_text("xyz\n")
    env = {"MLXD_GROUP_SECRET_FILE": str(path)}
    assert secret_from_env(env) == b"xyz" and not path.exists() and env == {}
    with pytest.raises(TransportError, match="no group secret"):
        secret_from_env({})


def test_the_secret_never_travels_in_a_command_line():
    plan = ranks.Plan(("10.0.0.1", "10.0.0.2"), (40001, 32324), "10.0.0.1:40002", "ring")
    cmd = ranks.secret_command("10.0.0.2")
    assert "-tt" not in cmd and "umask 077" in cmd[-1] and "cat >" in cmd[-1]     # stdin, no pty to echo it
    script = ranks.remote_command("10.0.0.2", 1, plan, "python3", "/srv", ["-m", "daemon.worker"],
                                  env={"MLXD_GROUP_SECRET_FILE": "/tmp/tmp.abc"})[-1]
    assert "export MLXD_GROUP_SECRET_FILE=/tmp/tmp.abc;" in script


# -- the doorbell, over real sockets ------------------------------------------------------------

def _intruder(endpoint: str, secret: bytes | None, result: list) -> None:
    """Connects first; proves `secret` (a wrong one) or sends junk, then tries to report."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            if secret is None:
                while len(nonce := s.recv(32)) < 32 and nonce:
                    pass
                s.sendall(b"\x00" * 64 + b'{"rank": 1, "error": null}\n')
            else:
                follower_handshake(s, secret)
            s.sendall(b'{"rank": 1, "error": null}\n')
            result.append(s.recv(1))
        except (TransportError, OSError) as e:
            result.append(e)


@pytest.mark.parametrize("intruder_secret", [None, b"not the secret"], ids=["junk", "wrong-secret"])
def test_a_doorbell_connection_without_the_secret_is_refused(intruder_secret):
    port = ranks.free_port("127.0.0.1")
    endpoint = f"127.0.0.1:{port}"
    bells = Bells(endpoint, 1, SECRET)
    gathered = threading.Thread(target=bells.gather, kwargs={"timeout": 60})
    gathered.start()
    seen: list = []
    _intruder(endpoint, intruder_secret, seen)
    # the intruder was refused: rank 0 closed on it, proving nothing and ringing nothing
    assert seen and (isinstance(seen[0], (TransportError, OSError)) or seen[0] == b""), seen
    assert not bells.socks
    bell = Bell(endpoint, 1, SECRET)          # the real follower still gets in
    bell.report(None)
    gathered.join(60)
    assert not gathered.is_alive() and len(bells.socks) == 1
    bells.ring()
    assert bell.wait()


def test_a_follower_refuses_a_listener_without_the_secret():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def impostor():
        conn, _ = server.accept()
        with conn:
            try:
                leader_handshake(conn, b"not the secret")
            except TransportError:
                conn.sendall(b"\x00" * 32)          # answers anyway, with a made-up proof

    t = threading.Thread(target=impostor)
    t.start()
    with pytest.raises(TransportError):
        Bell(f"127.0.0.1:{port}", 1, SECRET, timeout=10)
    t.join(10)
    server.close()


def test_a_sealed_header_is_what_the_follower_checks():
    data = Sealer(SECRET).seal(OPS)
    magic, version, seq = struct.unpack(">4sBQ", data[:13])
    assert (magic, version, seq) == (b"MLXG", 1, 1)


def test_a_failed_store_on_a_follower_is_counted_and_the_rank_goes_on():
    """Defect 5: as on rank 0, storing a finished request's cache is best effort on a follower."""
    from types import SimpleNamespace

    from daemon.worker.group import Follower

    class FailingCache:      # the prefix cache's part is stubbed: this is the follower's dispatch alone
        counters = {"store_errors": 0}

        def store(self, tokens, cache):
            raise OSError("disk full")

    engine = SimpleNamespace(prefix_cache=FailingCache())
    f = Follower(engine, SimpleNamespace(rank=1), SECRET)
    f.kept[7] = (["kv"], [1, 2, 3])
    f._store(7)             # before the fix: OSError, and the rank died
    assert f.store_errors == 1 and engine.prefix_cache.counters["store_errors"] == 1 and not f.kept
