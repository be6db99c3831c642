"""One table per GGUF architecture: how its tensors and metadata become an mlx-lm model.

Each table says which mlx-lm model runs it, how llama.cpp's tensor names map to HF's,
whether llama.cpp permuted the Q/K rows (llama-family converters do, for interleaved
rope), what its converter baked into the norms, and the config llama.cpp hard-codes
instead of storing. Adding an architecture is adding a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# llama.cpp's per-layer names -> HF's, shared by every architecture here.
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Arch:
    model_type: str  # mlx-lm's
    architectures: str  # HF's class name, for config.json readers
    hidden_act: str = "silu"
    permute_qk: bool = False  # llama.cpp reordered q/k rows for interleaved rope
    norm_offset: float = 0.0  # subtracted from every *norm.weight
    layer: dict = field(default_factory=dict)  # name overrides on top of _LAYER
    extra: Callable[[Callable, dict], dict] = lambda get, config: {}  # config llama.cpp does not store
    skip: tuple = ()  # name prefixes of tensors a text model does not use (a bundled vision tower)

    def layer_name(self, gguf_name: str) -> str | None:
        return self.layer.get(gguf_name, _LAYER.get(gguf_name))


def _gemma3(get, config):
    n_layers = config["num_hidden_layers"]
    # llama.cpp's fixed choices (src/llama-model.cpp): the 27B model scales queries by
    # hidden/heads, every other size by head_dim; five local layers per global one.
    scalar = config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else config["head_dim"]
    return {
        "sliding_window": get("attention.sliding_window"),
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scalar,
    }


ARCHS = {
    "llama": Arch("llama", "LlamaForCausalLM", permute_qk=True),  # Llama 1-3.x and Mistral 7B files
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM"),
    "gemma3": Arch(
        "gemma3_text",
        "Gemma3ForCausalLM",
        hidden_act="gelu_pytorch_tanh",
        skip=("v.", "mm."),  # Ollama's gemma3 blobs carry the vision encoder and projector
        norm_offset=1.0,  # llama.cpp's converter stores 1 + w; mlx-lm's Gemma RMSNorm adds the 1 itself
        layer={
            "ffn_norm": "pre_feedforward_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        extra=_gemma3,
    ),
}
