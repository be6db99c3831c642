"""The default context length: what memory can hold for a full batch, not what the model allows.

A model's `max_position_embeddings` is often 128K or more; with that as the limit one
request could allocate tens of GB of KV. So when `engine.context_length` is unset, the
limit is the longest context of which `max_batch_size` requests fit in the memory left
after the weights and the prefix cache's memory tier: `server.memory_budget` when set,
else the machine's (Metal's recommended working set; 3/4 of RAM on a CPU, Metal's share).
The KV per token comes from the model's config (an upper bound for models with sliding or
linear-attention layers). It is never above the model's own limit, and never below
`FLOOR` tokens (less is no use; the log then says what to change). An explicit setting is
the user's choice and is kept whatever it costs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("mlxd.worker")

STEP = 256           # mlx-lm's KVCache grows in steps of 256 tokens
FLOOR = 4096
FALLBACK = 4096      # a model that names no max_position_embeddings


def text_config(path: Path) -> dict:
    """The model's config.json (its text part, for multimodal configs); {} if unreadable."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg.get("text_config") or cfg if isinstance(cfg, dict) else {}


def kv_bytes_per_token(cfg: dict, dtype_bytes: int) -> Optional[int]:
    """layers with KV × kv_heads × head_dim × 2 (keys and values) × dtype bytes; None if the
    config does not say. Layers the config marks as conv or linear attention hold no KV."""
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg.get("num_attention_heads") or 0)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or (int(cfg["hidden_size"]) // heads))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        layers = sum(1 for t in types if "attention" in str(t) and "linear" not in str(t))
    elif cfg.get("full_attention_interval"):
        layers = layers // int(cfg["full_attention_interval"])
    if min(layers, kv_heads, head_dim) <= 0:
        return None
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def machine_memory() -> int:
    """Bytes the workers of this machine may use when no budget is set."""
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4


@dataclass
class Choice:
    tokens: int
    why: str


def choose(*, explicit: Optional[int], model_max: Optional[int], kv_per_token: Optional[int], batch: int,
           memory: int, weights: int, cache_memory: int, budget_named: bool) -> Choice:
    """The context length and a sentence saying where it comes from (pure, for the log and tests)."""
    if explicit:
        return Choice(explicit, "engine.context_length")
    top = int(model_max or FALLBACK)
    if not kv_per_token:
        return Choice(top, "the model's max_position_embeddings (its config names no KV shape)")
    source = "server.memory_budget" if budget_named else "this machine's memory"
    room = memory - weights - cache_memory
    fits = max(room, 0) // (batch * kv_per_token) // STEP * STEP
    what = (f"{source} {memory / 2**30:.1f} GiB less weights {weights / 2**30:.2f} GiB and prefix cache "
            f"{cache_memory / 2**30:.2f} GiB holds {fits} tokens for each of {batch} requests "
            f"at {kv_per_token} KV bytes/token")
    if fits >= top:
        return Choice(top, f"the model's max_position_embeddings ({what})")
    floor = min(FLOOR, top)
    if fits < floor:
        return Choice(floor, f"the floor of {floor} tokens, above what fits: {what}; lower "
                             "engine.max_batch_size or set engine.context_length")
    return Choice(fits, what)
