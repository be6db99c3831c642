"""Daemon <-> worker messages: length-prefixed JSON frames over a socketpair.

A socketpair (not the worker's stdout) carries the protocol so that anything a library
prints can never corrupt it. Frames are small dicts with an `op` field:

daemon -> worker: submit, cancel, stats, cache_clear, shutdown
worker -> daemon: ready, stats, fatal, and a request's events (`events.py`: started,
progress, text, reasoning, tool_call, tool_args, done, error)
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

_HEADER = struct.Struct(">I")
GROUP_FAILED = "a rank of the group failed"    # starts a group's rank 0 `fatal`: the daemon finds the rank to blame
MAX_FRAME = 64 * 1024 * 1024


def encode(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
    return _HEADER.pack(len(body)) + body


class SyncChannel:
    """The worker's side: blocking reads on a reader thread, writes from any thread."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._rfile = sock.makefile("rb")

    def recv(self) -> dict | None:
        """The next frame; None when the daemon has gone. ValueError for a frame that breaks
        the protocol (oversized, not a JSON object with an `op`): nothing after it can be trusted."""
        header = self._rfile.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack(header)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes (limit {MAX_FRAME})")
        body = self._rfile.read(n)
        if len(body) < n:
            return None
        return _decode(body)

    def send(self, msg: dict) -> None:
        self._sock.sendall(encode(msg))

    def send_many(self, msgs: list[dict]) -> None:
        if msgs:
            self._sock.sendall(b"".join(encode(m) for m in msgs))


def _decode(body: bytes) -> dict:
    try:
        msg = json.loads(body)
    except ValueError as e:      # bad JSON or bad UTF-8
        raise ValueError(f"frame is not JSON ({e})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ValueError("frame is not an object with an 'op'")
    return msg


async def read_frame(reader: asyncio.StreamReader) -> dict | None:
    """The daemon's side; None when the worker has gone, ValueError for a frame that breaks the protocol."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (n,) = _HEADER.unpack(header)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes (limit {MAX_FRAME})")
        body = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return _decode(body)
