"""What the console shows, as one JSON-able snapshot of the daemon's state.

Times are sent as wall-clock stamps (started, last used), never as ages, so an idle
daemon's snapshot does not change from one second to the next and is not re-sent.
"""

from __future__ import annotations

import time


def _cache(h) -> dict | None:
    if not h.cfg.prefix_cache.enabled:
        return None
    c = h.stats.get("cache") or {}
    mem, disk = c.get("memory") or {}, c.get("disk") or {}
    totals = h.counters()
    pc = h.cfg.prefix_cache
    return {
        "memory": {"entries": mem.get("entries", 0), "bytes": mem.get("bytes", 0), "budget": pc.memory_budget},
        "disk": {"entries": disk.get("entries", 0), "bytes": disk.get("bytes", 0), "budget": pc.disk_budget},
        "query_tokens": c.get("query_tokens", 0), "hit_tokens": c.get("hit_tokens", 0),
        "evictions": totals["evictions"], "corrupt": totals["corrupt"], "disk_errors": totals["disk_errors"],
        "kv_bits": pc.kv_bits,
    }


def model(h, recent, pending: bool = False) -> dict:
    info = h.worker_info
    ready = h.state == "ready"
    return {
        "name": h.name, "aliases": list(h.cfg.aliases), "state": h.state, "pending": pending,
        "error": h.last_error or None, "source": h.cfg.source,
        "device": info.get("device"), "dtype": info.get("dtype"), "blas": info.get("blas"),
        "pid": h.pid,
        "memory_bytes": h.stats.get("memory_bytes", 0) if ready else 0,
        "started": h.started_wall if ready else None, "restarts": h.restarts,
        "in_flight": h.in_flight,
        "running": h.stats.get("running", 0) if ready else 0,
        "waiting": h.stats.get("waiting", 0) if ready else 0,
        "tokens_per_s": recent.tokens_per_s(h.name),
        "last_used": h.last_used, "pinned": h.pinned, "idle_ttl": h.cfg.idle_ttl, "preload": h.cfg.preload,
        "max_tokens": h.cfg.sampling.max_tokens, "temperature": h.cfg.sampling.temperature,
        "cache": _cache(h),
    }


def snapshot(sup) -> dict:
    recent = sup.metrics.recent
    auth = sup.config.server.auth
    return {
        "started": sup.started,
        "auth": bool(auth.api_keys),
        "draining": sup.draining,
        "config": sup.status(),
        "models": [model(h, recent) for h in sup.handles.values()]
                  + [model(h, recent, pending=True) for h in sup.pending.values()],
        "requests": recent.records(),
    }


def stamped(snap: dict) -> dict:
    return {"now": time.time(), **snap}
