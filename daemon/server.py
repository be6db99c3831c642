"""Run the supervisor, the config watcher and the HTTP API until a signal says stop.

Stopping is graceful: new requests get 503 with Retry-After, in-flight ones get the
configured deadline to finish, then workers cancel what is left and flush their prefix
caches to disk, and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from .api import create_app
from .config import Config
from .lifecycle.supervisor import Supervisor
from .watch import watch_config

log = logging.getLogger("mlxd")


# Each connection's kernel send buffer. Autotuned, it grows to megabytes (4 MiB on Linux and
# macOS), which a client that stops reading fills before a single write waits, and so before
# `server.stream_write_timeout` starts counting; fixed, it is plenty for token streams.
SEND_BUFFER = 128 << 10


class _Config(HypercornConfig):
    def create_sockets(self):
        sockets = super().create_sockets()
        for s in sockets.insecure_sockets:       # accepted connections inherit it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        return sockets


def _hypercorn_config(host: str, port: int) -> HypercornConfig:
    hc = _Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 5.0
    hc.keep_alive_timeout = 75.0
    return hc


async def _drain(supervisor: Supervisor, deadline: float) -> None:
    supervisor.draining = True
    log.info("stopping: no new requests; waiting up to %.0fs for %d in flight", deadline, supervisor.in_flight())
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while supervisor.in_flight() and loop.time() < end:
        await asyncio.sleep(0.05)
    if supervisor.in_flight():
        log.warning("deadline reached; cancelling %d request(s)", supervisor.in_flight())
    await supervisor.stop()


async def run(config: Config, host: str, port: int, json_logs: bool = False, config_path: Path | None = None) -> int:
    supervisor = Supervisor(config, json_logs=json_logs, config_path=str(config_path) if config_path else None)
    await supervisor.start()
    app = create_app(supervisor, host, port)

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    stop_watch = asyncio.Event()
    signals = 0

    def on_stop_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            supervisor.kill_workers()
            os._exit(1)

        async def graceful():
            await _drain(supervisor, supervisor.config.server.shutdown_timeout)   # as reloaded
            stopped.set()
        loop.create_task(graceful())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: supervisor.spawn(supervisor.reload()))
        templates = lambda: [m.chat_template for m in supervisor.config.models if m.chat_template]
        watcher = loop.create_task(watch_config(config_path, supervisor.reload, stop_watch, also=templates,
                                                on_error=lambda: supervisor.metrics.internal_error("watch")))

    log.info("mlxd listening on http://%s:%d with %d model(s)", host, port, len(config.models))
    if host not in ("127.0.0.1", "localhost", "::1") and not config.server.auth.api_keys:
        log.warning("!" * 72)
        log.warning("mlxd is bound to %s WITHOUT API keys: anyone who can reach this port can use", host)
        log.warning("your models. Set server.auth.api_keys in the config, or bind 127.0.0.1.")
        log.warning("!" * 72)
    try:
        await serve(app, _hypercorn_config(host, port), shutdown_trigger=stopped.wait)
    finally:
        stop_watch.set()
        if config_path is not None:
            watcher.cancel()
        await supervisor.stop()
    log.info("stopped")
    return 0
