"""One rank's stage of a model split into pipeline stages over MLX distributed.

mlx-lm pipelines the architectures whose inner model mixes in `PipelineMixin` (qwen2,
qwen3_moe, deepseek...). For llama (SmolLM2, Mistral, Llama 3), qwen3 and gemma3_text we hand
`load_model` subclasses through its public `get_model_classes` hook: the same modules,
with `PipelineMixin` and a `__call__` that follows qwen2's (the first stage embeds, the
others receive the hidden state, each sends it on, the last one's is gathered everywhere).
mlx-lm is never patched.

Rank r runs the layers after those of ranks r+1..size-1, so rank size-1 embeds and rank 0
runs the last layers; `split[r]` is rank r's number of layers (mlx-lm's convention).
Weights load lazily and the other stages' layers are dropped before anything is evaluated,
so a rank never reads them (embeddings, final norm and head are kept on every rank: each
one computes the logits and samples the same token).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models import gemma3_text, llama, qwen3
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.pipeline import PipelineMixin
from mlx_lm.utils import load_model, load_tokenizer

# mlx-lm's own choice of classes for a config: the default of load_model's public hook.
_default_classes = inspect.signature(load_model).parameters["get_model_classes"].default


@dataclass(frozen=True)
class Stage:
    rank: int
    size: int
    start: int      # first layer
    end: int        # one past the last layer

    @property
    def tag(self) -> str:
        """Names this rank's shard in prefix-cache records and files: "r1of2-L0-14"."""
        return f"r{self.rank}of{self.size}-L{self.start}-{self.end - 1}"


def stage(model) -> Stage:
    """The layers this process runs (the whole model when it is not pipelined)."""
    inner = getattr(model, "model", None)
    if getattr(inner, "pipeline_size", 1) > 1:
        return Stage(inner.pipeline_rank, inner.pipeline_size, inner.start_idx, inner.end_idx)
    return Stage(0, 1, 0, len(model.layers))


def _run(inner, h: mx.array, cache, masks) -> mx.array:
    """qwen2's pipelined forward over this stage's layers, `masks[i]` for layer i."""
    rank, size = inner.pipeline_rank, inner.pipeline_size
    if rank < size - 1:
        h = mx.distributed.recv_like(h, rank + 1)
    for layer, c, mask in zip(inner.pipeline_layers, cache, masks):
        h = layer(h, mask, c)
    if rank != 0:
        h = mx.distributed.send(h, (rank - 1) % size)
        if cache[-1] is not None:
            cache[-1].keys = mx.depends(cache[-1].keys, h)
    if size > 1:
        h = mx.distributed.all_gather(h)[: h.shape[0]]
    return inner.norm(h)


def _masks(h, cache, sliding: list[bool], window: Optional[int]) -> list:
    """One mask per layer of the stage: the full-attention and the sliding-window masks are
    each made from the first cache of their kind in this stage (layer indices are global)."""
    out, made = [], {}
    for c, s in zip(cache, sliding):
        if s not in made:
            made[s] = create_attention_mask(h, c, window_size=window) if s else create_attention_mask(h, c)
        out.append(made[s])
    return out


class _StageModel(PipelineMixin):
    """An architecture's inner model, pipelined: mixed in before it (`class X(_StageModel, Inner)`)."""

    window: Optional[int] = None

    def __init__(self, args):
        super(PipelineMixin, self).__init__(args)    # the architecture's own __init__
        self.pipeline_rank, self.pipeline_size, self.start_idx, self.end_idx = 0, 1, 0, None

    def _embed(self, inputs):
        return self.embed_tokens(inputs)

    def _sliding(self, layer) -> bool:
        return False

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self._embed(inputs)
        layers = self.pipeline_layers
        cache = cache if cache is not None else [None] * len(layers)
        return _run(self, h, cache, _masks(h, cache, [self._sliding(layer) for layer in layers], self.window))


class LlamaStageModel(_StageModel, llama.LlamaModel):
    def _sliding(self, layer) -> bool:
        return layer.use_sliding

    @property
    def window(self):
        return self.sliding_window


class Qwen3StageModel(_StageModel, qwen3.Qwen3Model):
    pass


class Gemma3StageModel(_StageModel, gemma3_text.Gemma3Model):
    def _embed(self, inputs):
        h = self.embed_tokens(inputs)
        return h * mx.array(self.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)

    def _sliding(self, layer) -> bool:
        return layer.self_attn.is_sliding

    @property
    def window(self):
        return self.window_size


def _stage_of(base, inner):
    """The architecture's Model with the pipelined inner model; `layers` (what the KV cache is
    made for) are this stage's."""
    class Stage(base):
        def __init__(self, args):
            super().__init__(args)
            self.model = inner(args)

        @property
        def layers(self):
            return self.model.pipeline_layers

    Stage.__name__ = Stage.__qualname__ = f"{base.__module__.rsplit('.', 1)[-1]}_stage"
    return Stage


class Gemma3Stage(_stage_of(gemma3_text.Model, Gemma3StageModel)):
    def make_cache(self):      # gemma3_text's counts every layer of the model
        return [RotatingKVCache(max_size=self.args.sliding_window) if layer.self_attn.is_sliding else KVCache()
                for layer in self.layers]


_STAGES = {llama.Model: _stage_of(llama.Model, LlamaStageModel), qwen3.Model: _stage_of(qwen3.Model, Qwen3StageModel),
           gemma3_text.Model: Gemma3Stage}


def _stage_classes(config: dict):
    """load_model's hook: our pipelined subclass where we have one; refuses, before any
    weight is looked at, an architecture whose module has no pipelined model."""
    model_class, args_class = _default_classes(config)
    model_class = _STAGES.get(model_class, model_class)
    if not any(isinstance(v, type) and issubclass(v, PipelineMixin) and v is not PipelineMixin
               for v in vars(sys.modules[model_class.__module__]).values()):
        raise _cannot_pipeline(config)
    return model_class, args_class


def _cannot_pipeline(config: dict) -> ValueError:
    return ValueError(f"model type {config.get('model_type')!r} cannot be split into pipeline stages (mlxd "
                      f"pipelines llama, qwen3, gemma3_text and mlx-lm's models with PipelineMixin: qwen2, qwen3_moe, "
                      f"qwen3_next, deepseek_v3, glm4_moe...)")


def load_stage(path, group, *, split: Optional[list[int]] = None, tokenizer_config: Optional[dict] = None):
    """This rank's stage of the model at `path` and its tokenizer; every rank of `group` calls it.
    Raises ValueError naming the architecture when it cannot be pipelined, or for a bad split."""
    path = Path(path)
    model, config = load_model(path, lazy=True, get_model_classes=_stage_classes)
    inner = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        raise _cannot_pipeline(config)      # a wrapper (a VLM's) around a pipelined text model
    inner.pipeline(group, split)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    # Every rank is loaded before the first step's collectives start (as mlx-lm's sharded_load).
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer
