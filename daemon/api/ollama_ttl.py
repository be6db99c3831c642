"""Ollama's `keep_alive`, mapped onto a model's idle TTL and unload.

Ollama takes a number of seconds or a Go duration ("5m", "1h30m", "300ms"): 0 unloads the
model once the request is answered, a negative value keeps it loaded (no idle TTL), and a
positive one becomes the model's idle TTL from now on, as if its entry said `idle_ttl`, until
the entry changes (like a runtime pin). Absent: the config's `idle_ttl` stands.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from .errors import APIError

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER = math.inf


def parse(value) -> Optional[float]:
    """Seconds (FOREVER for a negative value), None when absent; a 400 for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise APIError(400, "keep_alive must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise APIError(400, f"keep_alive {value!r} is not a duration such as \"5m\", \"1h30m\" or \"-1\"",
                               param="keep_alive") from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise APIError(400, "keep_alive must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    if math.isnan(seconds):
        raise APIError(400, "keep_alive is not a number", param="keep_alive")
    return FOREVER if seconds < 0 else seconds


def before(handle, seconds: Optional[float]) -> None:
    """A positive or negative keep_alive applies before the request (the model stays while it runs)."""
    if seconds is not None and seconds > 0:
        handle.ttl_override = (handle.cfg, None if seconds == FOREVER else seconds)


def after(handle, seconds: Optional[float], supervisor) -> None:
    """keep_alive 0: unload once this request is answered (others in flight get drain_timeout)."""
    if seconds == 0:
        handle.ttl_override = (handle.cfg, handle.cfg.idle_ttl)
        supervisor.spawn(handle.unload(supervisor.config.server.drain_timeout))
