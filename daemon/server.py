"""Run the supervisor and the HTTP API together until a signal says stop."""

from __future__ import annotations

import asyncio
import logging
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from .api import create_app
from .config import Config
from .supervisor import Supervisor

log = logging.getLogger("mlxd")


async def run(config: Config, host: str, port: int, json_logs: bool = False) -> int:
    supervisor = Supervisor(config, json_logs=json_logs)
    await supervisor.start()
    app = create_app(supervisor)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 5.0
    hc.keep_alive_timeout = 75.0
    log.info("mlxd listening on http://%s:%d with %d model(s)", host, port, len(config.models))
    try:
        await serve(app, hc, shutdown_trigger=stop.wait)
    finally:
        log.info("stopping workers")
        await supervisor.stop()
    return 0
