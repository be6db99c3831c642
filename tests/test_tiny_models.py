"""The tiny architecture models load through mlxd's own loading and decode deterministically.

They stand in for real Gemma 3 / gpt-oss / Qwen3.5 / LFM2 checkpoints in the cache tests, so
what is checked here is what those tests rely on: each directory resolves as an MLX model
directory, the worker's `load` builds an engine on it, its cache has the family's layer
kinds, both chat templates render, and greedy decoding is the same every time and never
stops early on a special token.
"""

from __future__ import annotations

import pytest
from mlx_lm import generate
from mlx_lm.models.cache import make_prompt_cache

from daemon.config import ModelConfig
from daemon.models import resolve_model
from daemon.worker.__main__ import load
from tiny_models import ARCHS, CHATML, thinking_template, tiny_model

# What each family's make_cache returns, layer by layer.
LAYERS = {
    "llama": ["KVCache"] * 4,
    "gemma3_text": ["RotatingKVCache"] * 5 + ["KVCache"],
    "gpt_oss": ["RotatingKVCache", "KVCache"] * 2,
    "qwen3_5": ["ArraysCache"] * 3 + ["KVCache"],
    "lfm2": ["ArraysCache", "ArraysCache", "KVCache", "ArraysCache"],
}
CHAT = [{"role": "system", "content": "You answer questions about caches."},
        {"role": "user", "content": "Why does a sliding window cache forget the start of a prompt?"}]


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_through_mlxd_and_decodes_deterministically(arch, tmp_path):
    path = tiny_model(arch)
    resolved = resolve_model(str(path), cache_dir=tmp_path)
    assert (resolved.kind, resolved.dtype) == ("mlx-dir", "float32")
    assert tiny_model(arch) == path       # built once: the second call finds it by its hash

    engine, info = load(ModelConfig(name=arch, source=str(path)), tmp_path)
    assert info["fingerprint"] == resolved.fingerprint
    assert [type(c).__name__ for c in make_prompt_cache(engine.model)] == LAYERS[arch]
    tok = engine.tokenizer
    assert tok.has_thinking and tok.chat_template == CHATML

    prompt = engine.render({"messages": CHAT})
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    first = generate(engine.model, tok, ids, max_tokens=24)
    again = generate(engine.model, tok, ids, max_tokens=24)
    assert first == again and first.strip()
    out = tok.encode(first, add_special_tokens=False)
    assert not {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>", "<think>")} & set(out)

    thinking, _ = load(ModelConfig(name=arch, source=str(path), chat_template=thinking_template(arch)), tmp_path)
    rendered = thinking.render({"messages": CHAT + [{"role": "assistant", "content": "<think>\nhm\n</think>\n\nIt slides."},
                                                    {"role": "user", "content": "And a recurrent one?"}]})
    # Qwen3's template: the past answer without its reasoning, and a generation prompt that opens one.
    assert "<|im_start|>assistant\nIt slides.<|im_end|>" in rendered and "hm" not in rendered
    assert rendered.endswith("<|im_start|>assistant\n<think>\n")
