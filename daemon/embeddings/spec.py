"""What an embedding model computes, read from its directory and its config entry.

A sentence-transformers directory says it all: `modules.json` lists the modules (a
`Normalize` one means unit vectors), `1_Pooling/config.json` the pooling, and
`sentence_bert_config.json` the window. Without one (a decoder embedder marked
`kind: embedding`), the defaults are the usual ones: last token for decoders, mean for
encoders, normalised. Pure JSON reading: the daemon's unit tests need no MLX.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ENCODERS = ("bert",)          # our own MLX encoder (bert.py); everything else goes through mlx-lm

# 1_Pooling/config.json flags, in the order sentence-transformers checks them
_POOLING_FLAGS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"),
                  ("pooling_mode_mean_tokens", "mean"))
_UNSUPPORTED_FLAGS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class EmbedSpec:
    arch: str                 # "bert" (our encoder) or "decoder" (mlx-lm's model classes)
    model_type: str           # config.json's model_type
    pooling: str              # mean | cls | last
    normalize: bool
    max_seq_length: int       # tokens per input, special tokens included
    dimensions: int           # the vector's length
    matryoshka: bool          # trained for shorter vectors (its model card says so)
    sentence_transformers: bool

    def info(self) -> dict:
        return asdict(self)


def _read(path: Path) -> Optional[dict | list]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SpecError(f"{path} cannot be read as JSON: {e}") from None


def is_sentence_transformers(path: Path) -> bool:
    return (Path(path) / "modules.json").is_file()


def is_embedding_dir(path: Path) -> bool:
    """Whether a model directory is an embedding model by itself (no `kind` needed)."""
    return is_sentence_transformers(path)


def _pooling_of(cfg: dict, where: Path) -> str:
    on = [name for flag, name in _POOLING_FLAGS if cfg.get(flag)]
    odd = [flag for flag in _UNSUPPORTED_FLAGS if cfg.get(flag)]
    if odd or len(on) != 1:
        what = ", ".join(odd) if odd else ("no pooling mode" if not on else "several pooling modes: " + ", ".join(on))
        raise SpecError(f"{where}: {what}; mlxd pools by mean, CLS or last token only "
                        "(set embedding.pooling in the model's entry to override)")
    return on[0]


def _matryoshka(path: Path) -> bool:
    """A model card that names Matryoshka (its tags or text): trained for truncated vectors."""
    try:
        card = (path / "README.md").read_text(errors="replace")[:20000]
    except OSError:
        return False
    return re.search(r"matryoshka", card, re.IGNORECASE) is not None


def detect(path: Path, embedding=None) -> EmbedSpec:
    """The spec of the embedding model in `path`; `embedding` is the entry's `embedding:`
    block (config.Embedding), whose set fields override the directory's."""
    path = Path(path)
    config = _read(path / "config.json")
    if not isinstance(config, dict):
        raise SpecError(f"{path} has no config.json")
    model_type = str(config.get("model_type", ""))
    arch = "bert" if model_type in ENCODERS else "decoder"
    st = is_sentence_transformers(path)
    pooling, normalize, window = ("last" if arch == "decoder" else "mean"), True, None
    if st:
        modules = _read(path / "modules.json")
        if not isinstance(modules, list):
            raise SpecError(f"{path / 'modules.json'} is not a list of modules")
        types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
        normalize = "Normalize" in types
        for m in modules:
            if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling"):
                pool_cfg = _read(path / m.get("path", "1_Pooling") / "config.json")
                if isinstance(pool_cfg, dict):
                    pooling = _pooling_of(pool_cfg, path / m.get("path", "1_Pooling") / "config.json")
        if odd := [t for t in types if t not in ("Transformer", "Pooling", "Normalize")]:
            raise SpecError(f"{path}: sentence-transformers module(s) {', '.join(odd)} are not supported "
                            "(mlxd runs Transformer, Pooling and Normalize)")
        sbert = _read(path / "sentence_bert_config.json")
        if isinstance(sbert, dict) and sbert.get("max_seq_length"):
            window = int(sbert["max_seq_length"])
    positions = config.get("max_position_embeddings")
    window = window or (int(positions) if positions else 512)
    if embedding is not None:
        pooling = embedding.pooling or pooling
        normalize = normalize if embedding.normalize is None else embedding.normalize
        window = embedding.max_seq_length or window
    if positions and window > int(positions):
        raise SpecError(f"max_seq_length {window} is more than the model's {positions} positions")
    dims = config.get("hidden_size") or config.get("d_model") or config.get("n_embd")
    if not dims:
        raise SpecError(f"{path / 'config.json'} names no hidden_size")
    return EmbedSpec(arch=arch, model_type=model_type, pooling=pooling, normalize=normalize,
                     max_seq_length=window, dimensions=int(dims), matryoshka=_matryoshka(path),
                     sentence_transformers=st)
