"""What a pipeline group's ranks say to each other, authenticated with the group's secret.

The daemon draws a random secret for every start of a group (`process.py`) and hands it to
each rank out of band: `MLXD_GROUP_SECRET` in a local rank's environment, a 0600 temp file
(`MLXD_GROUP_SECRET_FILE`, written from ssh's stdin) on a remote one; never on a command
line. With it:

- the step broadcast is JSON, sealed: magic, version, sequence number, HMAC-SHA256 over all
  of them and the JSON bytes. A follower refuses anything else (a pickle, a tampered or
  replayed or out-of-order message) and leaves the group, which restarts;
- a doorbell connection starts with a mutual challenge (each side proves it holds the
  secret over the other's fresh nonce) before a byte of it is trusted;
- once the ring is up every rank proves the secret over it (`ring_tags`), so a stranger
  who took a rank's ring port is found before any step.

Pure Python (no MLX): the wire format is unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct

MAGIC = b"MLXG"
VERSION = 1
_HEAD = struct.Struct(">4sBQ")          # magic, version, sequence number
TAG = hashlib.sha256().digest_size
NONCE = 32


class TransportError(Exception):
    """A message or a peer that does not prove the group's secret."""


def new_secret() -> str:
    return secrets.token_hex(32)


def secret_from_env(env=os.environ) -> bytes:
    """This rank's group secret, taken out of the environment (and its file removed) so that
    nothing this process starts inherits it."""
    value = env.pop("MLXD_GROUP_SECRET", None)
    path = env.pop("MLXD_GROUP_SECRET_FILE", None)
    if value is None and path:
        with open(path) as f:
            value = f.read().strip()
        os.unlink(path)
    if not value:
        raise TransportError("no group secret (MLXD_GROUP_SECRET or MLXD_GROUP_SECRET_FILE) in the environment")
    return value.encode()


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


class Sealer:
    """Rank 0's side of the broadcast: every message numbered and signed."""

    def __init__(self, secret: bytes):
        self.secret, self.seq = secret, 0

    def seal(self, obj) -> bytes:
        self.seq += 1
        body = json.dumps(obj, separators=(",", ":")).encode()
        head = _HEAD.pack(MAGIC, VERSION, self.seq)
        return head + _mac(self.secret, head, body) + body


class Opener:
    """A follower's side: only rank 0's next message, intact, is accepted."""

    def __init__(self, secret: bytes):
        self.secret, self.seq = secret, 0

    def open(self, data: bytes):
        data = bytes(data)
        if len(data) < _HEAD.size + TAG:
            raise TransportError(f"a group message of {len(data)} bytes is too short")
        head, tag, body = data[:_HEAD.size], data[_HEAD.size:_HEAD.size + TAG], data[_HEAD.size + TAG:]
        magic, version, seq = _HEAD.unpack(head)
        if magic != MAGIC:
            raise TransportError("a group message without the group's magic (a pickle, or not ours): refused")
        if version != VERSION:
            raise TransportError(f"a group message of version {version} (this rank speaks {VERSION})")
        if not hmac.compare_digest(tag, _mac(self.secret, head, body)):
            raise TransportError("a group message whose signature does not match the group's secret")
        if seq != self.seq + 1:
            raise TransportError(f"a group message out of order (number {seq}, expected {self.seq + 1})")
        self.seq = seq
        return json.loads(body)


# -- the doorbell's handshake -------------------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise TransportError("the peer closed the connection during the group handshake")
        buf += chunk
    return buf


def leader_handshake(sock: socket.socket, secret: bytes) -> None:
    """Rank 0 accepts a doorbell: the follower proves the secret over rank 0's nonce, then
    rank 0 proves it over the follower's. TransportError (and nothing sent) for a stranger."""
    mine = secrets.token_bytes(NONCE)
    sock.sendall(mine)
    theirs = _recv_exact(sock, NONCE)
    proof = _recv_exact(sock, TAG)
    if not hmac.compare_digest(proof, _mac(secret, b"follower", mine, theirs)):
        raise TransportError("a doorbell connection without the group's secret")
    sock.sendall(_mac(secret, b"leader", theirs, mine))


def follower_handshake(sock: socket.socket, secret: bytes) -> None:
    """A follower's side: TransportError when the listener is not rank 0 of this group."""
    theirs = _recv_exact(sock, NONCE)
    mine = secrets.token_bytes(NONCE)
    sock.sendall(mine + _mac(secret, b"follower", theirs, mine))
    if not hmac.compare_digest(_recv_exact(sock, TAG), _mac(secret, b"leader", mine, theirs)):
        raise TransportError("the doorbell's listener does not hold the group's secret")


def ring_tag(secret: bytes, rank: int, size: int) -> bytes:
    """What rank `rank` shows the ring: only a holder of this start's secret can make it."""
    return _mac(secret, b"ring", struct.pack(">II", rank, size))
