"""The worker process: one model, its engine and its prefix cache.

Started by the daemon as `python -m daemon.worker --fd N --model JSON --cache-dir DIR`.
A reader thread turns frames from the daemon into an inbox; the main thread owns MLX and
alternates between handling the inbox and stepping the engine, blocking only when idle.
The worker exits when the daemon's end of the socket closes, so it never outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..protocol import GROUP_FAILED, SyncChannel

log = logging.getLogger("mlxd.worker")


def _reader(chan: SyncChannel, inbox: queue.Queue) -> None:
    """Frames into the inbox; None (shut down) when the daemon's end closes or breaks the protocol."""
    try:
        while (msg := chan.recv()) is not None:
            inbox.put(msg)
    except Exception as e:
        log.error("protocol error from the daemon (%s); exiting", e)
    finally:
        inbox.put(None)


def _context_length(model, cfg: ModelConfig, path: Path, memory_budget: Optional[int]) -> tuple[int, Optional[int]]:
    """(the context length, KV bytes per token): see context.py; logged with where it comes from."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from . import context

    mcfg = context.text_config(path)
    args = getattr(model, "args", None)
    model_max = mcfg.get("max_position_embeddings") or getattr(args, "max_position_embeddings", None)
    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    kv = context.kv_bytes_per_token(mcfg, floats[0].size if floats else 2)
    memory = memory_budget or context.machine_memory()
    cache_memory = cfg.prefix_cache.memory_budget if cfg.prefix_cache.enabled else 0
    choice = context.choose(explicit=cfg.engine.context_length, model_max=model_max, kv_per_token=kv,
                            batch=cfg.engine.max_batch_size, memory=memory, weights=mx.get_active_memory(),
                            cache_memory=cache_memory, budget_named=memory_budget is not None)
    log.info("model %s: context length %d tokens (%s)", cfg.name, choice.tokens, choice.why)
    return choice.tokens, kv


def tokenizer_config(cfg: ModelConfig) -> dict:
    """The model config's overrides of what the tokenizer declares (mlx-lm reads both keys)."""
    out = {}
    if cfg.chat_template:
        out["chat_template"] = Path(cfg.chat_template).expanduser().read_text()
    if cfg.tool_parser:
        out["tool_parser_type"] = "json_tools" if cfg.tool_parser == "hermes" else cfg.tool_parser
    return out


def load(cfg: ModelConfig, cache_dir, *, total_disk_budget=None, orphan_ttl=7 * 86400.0, group=None, bells=None,
         memory_budget=None):
    """Resolve the source, load weights (this rank's layers only, in a group), build the engine;
    returns (engine, info). `bells` makes rank 0's engine, `group` without them a follower's.
    `memory_budget`: server.memory_budget, which bounds the default context length."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    from ..models import resolve_model
    from .blas import device_name, loaded_blas
    from .engine import Engine
    from .cache.prefix import PrefixCache

    t0 = time.perf_counter()
    resolved = resolve_model(cfg.source, dtype=cfg.dtype, cache_dir=cache_dir)
    if is_embedding(cfg, resolved.path):
        return load_embedding(cfg, resolved, t0)
    stage, cache_args = None, {}
    if group is not None:
        from ..models.pipeline import load_stage, stage as stage_of

        split = list(cfg.distributed.split) if cfg.distributed.split else None
        model, tokenizer = load_stage(resolved.path, group, split=split, tokenizer_config=tokenizer_config(cfg))
        stage = stage_of(model)
        cache_args = {"stage": stage, "follower": bells is None}
    else:
        model, tokenizer = mlx_load(str(resolved.path), tokenizer_config=tokenizer_config(cfg))
    if resolved.dtype == "quantized" and not mx.metal.is_available():
        # GGUF scales are float16, and MLX's CPU quantized matmul is ~35x slower in float16.
        model.set_dtype(mx.float32)
        log.info("quantized weights on a CPU device: scales and activations in float32")
    context_length, kv_per_token = _context_length(model, cfg, resolved.path, memory_budget)   # weights only so far
    prefix_cache = None
    if cfg.prefix_cache.enabled:
        prefix_cache = PrefixCache(
            model, fingerprint=resolved.fingerprint, root=cache_dir / "prefix",
            memory_budget=cfg.prefix_cache.memory_budget, disk_budget=cfg.prefix_cache.disk_budget,
            kv_bits=cfg.prefix_cache.kv_bits, write_buffer=cfg.prefix_cache.write_buffer,
            block_tokens=cfg.prefix_cache.block_tokens, model_name=cfg.name,
            total_disk_budget=total_disk_budget, orphan_ttl=orphan_ttl, **cache_args)
    kind, extra = Engine, {}
    if bells is not None:
        from .group import LeaderEngine
        kind, extra = LeaderEngine, {"bells": bells, "hosts": cfg.distributed.hosts}
    elif group is not None:
        extra = {"stream": mx.default_stream(mx.default_device())}
    engine = kind(
        model, tokenizer,
        max_batch_size=cfg.engine.max_batch_size, prefill_batch_size=cfg.engine.prefill_batch_size,
        prefill_step_size=cfg.engine.prefill_step_size, context_length=context_length,
        default_max_tokens=cfg.sampling.max_tokens, prefix_cache=prefix_cache,
        reasoning_parser=cfg.reasoning_parser, checkpoint_every=cfg.prefix_cache.checkpoint_every,
        speculative=cfg.engine.speculative.model_dump() if cfg.engine.speculative else None, **extra)
    info = {
        "pid": os.getpid(), "path": str(resolved.path), "kind": resolved.kind, "dtype": resolved.dtype, "serves": "chat",
        "fingerprint": resolved.fingerprint, "device": device_name(), "blas": loaded_blas(),
        "context_length": engine.context_length, "thinking": engine.think is not None,
        "kv_bytes_per_token": kv_per_token, "load_seconds": round(time.perf_counter() - t0, 3),
        "mlx_memory_bytes": mx.get_active_memory(),
    }
    if group is not None:
        info["group"] = {"rank": group.rank(), "size": group.size(), "stage": stage.tag}
    return engine, info


def is_embedding(cfg: ModelConfig, path: Path) -> bool:
    from ..embeddings.spec import is_embedding_dir
    return cfg.kind == "embedding" or (cfg.kind is None and path.is_dir() and is_embedding_dir(path))


def load_embedding(cfg: ModelConfig, resolved, t0: float):
    """An embedding model's engine (`embeddings/engine.py`): same protocol, no generation."""
    import mlx.core as mx

    from ..embeddings.engine import load as load_embedder
    from .blas import device_name, loaded_blas

    engine, spec = load_embedder(cfg, resolved.path, resolved.dtype)
    info = {
        "pid": os.getpid(), "path": str(resolved.path), "kind": resolved.kind, "dtype": resolved.dtype,
        "serves": "embedding", "embedding": spec.info(), "fingerprint": resolved.fingerprint,
        "device": device_name(), "blas": loaded_blas(), "context_length": engine.context_length,
        "load_seconds": round(time.perf_counter() - t0, 3), "mlx_memory_bytes": mx.get_active_memory(),
    }
    return engine, info


def stats(engine) -> dict:
    import mlx.core as mx

    preparing = engine.preparer.count if getattr(engine, "preparer", None) is not None else 0
    out = {"running": engine.running, "waiting": engine.waiting + preparing,
           "memory_bytes": mx.get_active_memory(), "peak_memory_bytes": mx.get_peak_memory(),
           "internal_errors": engine.internal_errors, "batch_resets": engine.batch_resets}
    if engine.prefix_cache is not None:
        out["cache"] = engine.prefix_cache.stats()
    if hasattr(engine, "rank_memory"):       # a group: every rank's, and this machine's total
        out["ranks"] = engine.rank_memory()
        out["memory_bytes"] = sum(r["memory_bytes"] for r in out["ranks"] if r["local"])
        out["peak_memory_bytes"] = sum(r["peak_memory_bytes"] for r in out["ranks"] if r["local"])
    if engine.spec is not None:
        out["spec"] = {"draft_tokens": engine.spec.draft_tokens, "accepted_tokens": engine.spec.accepted_tokens}
    return out


def handle(engine, msg: dict) -> Optional[dict]:
    """One frame from the daemon; its reply, if any."""
    from .engine import RequestError, internal_error

    op = msg["op"]
    try:
        if op == "prepared":            # a submit the preparer has rendered and tokenized
            if "error" in msg:
                raise msg["error"]
            return engine.submit(msg["msg"], msg["prepared"])
        if op == "submit":
            return engine.submit(msg)
        if op == "cancel":
            return engine.cancel(msg["id"])
        if op == "stats":
            return {"op": "stats", "seq": msg.get("seq"), **stats(engine)}
        if op == "cache_clear":
            n = engine.clear_cache()
            return {"op": "cache_cleared", "seq": msg.get("seq"), "entries": n}
        if op == "count_tokens":
            try:
                return {"op": "token_count", "seq": msg.get("seq"), "tokens": len(engine.tokenize(msg)[0])}
            except RequestError as e:
                return {"op": "token_count", "seq": msg.get("seq"),
                        "error": {"message": str(e), "code": e.code, "param": e.param}}
    except RequestError as e:
        rid = msg.get("id") or msg.get("msg", {}).get("id")
        return {"op": "error", "id": rid, "message": str(e), "code": e.code, "param": e.param, "status": 400}
    except Exception as e:   # a bug or a bad cache entry: that request fails, the worker goes on
        log.exception("%s failed", op)
        engine.internal_errors += 1
        if op in ("submit", "prepared"):
            return internal_error(msg.get("id") or msg["msg"]["id"], e)
        if op == "count_tokens":
            return {"op": "token_count", "seq": msg.get("seq"),
                    "error": {"message": f"internal error: {type(e).__name__}: {e}", "code": "internal_error"}}
    return None


def _cancel_all(engine) -> list[dict]:
    ids = engine.request_ids() if hasattr(engine, "request_ids") else \
        [*engine.uid_of, *engine.parked, *(h.active.id for h in engine.held)]
    return [engine.cancel(rid) for rid in ids]


def serve(chan: SyncChannel, engine) -> None:
    """The main thread: frames from the inbox, then an engine step, until shutdown. Prompts are
    rendered and tokenized on the preparer's threads (`prepare.py`), never here."""
    from .prepare import Preparer

    inbox: queue.Queue = queue.Queue()
    engine.wake = lambda: inbox.put({"op": "wake"})      # a disk read or a grammar for a parked request is done
    # An embedding engine has no prompt to render: its submits are handled here, as before.
    preparer = engine.preparer = Preparer(engine, inbox.put) if hasattr(engine, "prepare") else None
    threading.Thread(target=_reader, args=(chan, inbox), daemon=True).start()
    try:
        _serve(chan, engine, inbox, preparer)
    except ConnectionError as e:        # the daemon died with requests in flight: keep their caches
        log.warning("the daemon's end of the socket is gone (%s); finishing the cache writes and exiting", e)
        _cancel_all(engine)
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    finally:
        if preparer is not None:
            preparer.close()
        if getattr(engine, "prefix_cache", None) is not None:
            engine.prefix_cache.close()      # always: a daemon gone mid-request must not lose the disk queue


def _serve(chan: SyncChannel, engine, inbox: queue.Queue, preparer) -> None:
    while True:
        msgs = []
        try:
            msgs.append(inbox.get(block=not engine.busy))
            while True:
                msgs.append(inbox.get_nowait())
        except queue.Empty:
            pass
        out: list[dict] = []
        for msg in msgs:
            if msg is None or msg["op"] == "shutdown":
                out += _cancel_all(engine)       # each stores its cache
                with contextlib.suppress(ConnectionError):
                    chan.send_many(out)          # a daemon that died has nobody to hear it
                if hasattr(engine, "shutdown"):
                    engine.shutdown()            # the group's other ranks store what was cancelled, then exit
                return
            op = msg["op"]
            if preparer is None:
                pass
            elif op == "submit":
                preparer.submit(msg)
                continue
            elif op == "count_tokens":
                preparer.count_tokens(msg)
                continue
            elif op == "cancel" and preparer.cancel(msg["id"]):
                continue
            elif op == "prepared" and not preparer.taken(msg["msg"]["id"]):
                continue                      # cancelled while it was being prepared
            if op == "reply":
                if msg["frame"].pop("internal", False):
                    engine.internal_errors += 1
                out.append(msg["frame"])
                continue
            if (reply := handle(engine, msg)) is not None:
                out.append(reply)
        chan.send_many(out)
        if engine.busy:
            try:
                events = engine.step()
            except Exception as e:      # step guards each request; this is the last resort
                events = engine.reset(e)
            chan.send_many(events)
        if hasattr(engine, "flush") and not engine.busy:
            engine.flush()                   # going idle: the other ranks catch up now, not at the next request


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.worker")
    p.add_argument("--fd", type=int, help="the socket to the daemon (rank 0 only)")
    p.add_argument("--model", required=True, help="the model's config entry as JSON")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--cache-disk-budget", type=int, help="bytes for every prefix cache under cache-dir together")
    p.add_argument("--cache-orphan-ttl", type=float, default=7 * 86400.0)
    p.add_argument("--memory-budget", type=int, help="server.memory_budget: bounds the default context length")
    p.add_argument("--rank", type=int, help="a distributed model's rank (MLX_RANK says the same)")
    p.add_argument("--doorbell", help="ip:port rank 0 of a distributed model listens on")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MLXD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = ModelConfig.model_validate(json.loads(args.model))
    if cfg.distributed is not None and int(os.environ.get("MLX_RANK", "0")) > 0:
        return follow(cfg, args)
    chan = SyncChannel(socket.socket(fileno=args.fd))
    bells = group = None
    try:
        if cfg.distributed is not None:
            import mlx.core as mx

            from .group import Bells
            from .transport import secret_from_env
            secret = secret_from_env()
            bells = Bells(args.doorbell, len(cfg.distributed.hosts) - 1, secret)   # bound before the others connect
            group = mx.distributed.init(backend=cfg.distributed.backend, strict=True)
        engine, info = load(cfg, Path(args.cache_dir), total_disk_budget=args.cache_disk_budget,
                            orphan_ttl=args.cache_orphan_ttl, group=group, bells=bells,
                            memory_budget=args.memory_budget)
        if bells is not None:
            from .group import verify_ring
            bells.gather()
            verify_ring(secret)
    except BaseException as e:
        traceback.print_exc()
        chan.send({"op": "fatal", "message": f"{type(e).__name__}: {e}" if not _is_group_failure(e) else str(e)})
        return 1
    log.info("model %s ready: %s", cfg.name, json.dumps(info))
    chan.send({"op": "ready", **info})
    try:
        serve(chan, engine)
    except BaseException as e:
        if not _is_group_failure(e):
            raise
        log.error("model %s: %s; exiting so that the group restarts", cfg.name, e)
        chan.send({"op": "fatal", "message": f"{GROUP_FAILED}: {e}"})
        return 1
    return 0


def _is_group_failure(e: BaseException) -> bool:
    from .group import GroupFailed
    return isinstance(e, GroupFailed)


def follow(cfg: ModelConfig, args) -> int:
    """Ranks 1..n-1: load this rank's layers, report to rank 0's doorbell, then follow its steps."""
    import mlx.core as mx

    from .group import Bell, Follower, verify_ring
    from .transport import secret_from_env

    rank = int(os.environ["MLX_RANK"])
    secret = secret_from_env()
    group = mx.distributed.init(backend=cfg.distributed.backend, strict=True)
    error = None
    try:
        engine, info = load(cfg, Path(args.cache_dir), total_disk_budget=args.cache_disk_budget,
                            orphan_ttl=args.cache_orphan_ttl, group=group, memory_budget=args.memory_budget)
    except Exception as e:
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    bell = Bell(args.doorbell, rank, secret)
    bell.report(error)
    if error:
        return 1
    verify_ring(secret)
    log.info("model %s rank %d of %d ready: %s", cfg.name, rank, group.size(), json.dumps(info))
    try:
        Follower(engine, bell, secret).run()
    finally:
        if engine.prefix_cache is not None:
            engine.prefix_cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
