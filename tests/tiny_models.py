"""Tiny random-weight MLX model directories in real architectures' layouts, for cache tests.

Each model is built from mlx-lm's own `ModelArgs` / `Model` for its architecture, so its
`make_cache` returns what the real family's does: plain KV (llama, the control), a
sliding window small enough to wrap inside a test (gemma3_text, gpt_oss), recurrent state
beside attention (qwen3_5: gated delta-net, lfm2: short convolutions). Weights come from
the model's own initialisers under a fixed seed (matrices scaled by `GAIN`); the rows of the output matrix that belong
to special tokens are scaled down so greedy decoding never picks them, which makes every
answer run to `max_tokens` (a chat turn is as long as the test asks).

They share one byte-level BPE tokenizer (~2048 tokens, trained with `tokenizers` on a
seeded synthetic corpus) with Qwen's markers: ChatML in tokenizer_config.json, and
`THINKING_TEMPLATE` (Qwen3's thinking template, which drops past reasoning) beside it for a
model entry's `chat_template`. A directory is built once, under `.cache/test/tiny/`, named
by a hash of everything that decides its content, and renamed into place when complete.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_CACHE = ROOT / ".cache" / "test" / "tiny"
FORMAT = 1          # bump when the layout of a directory changes
VOCAB = 2048
SEED = 0
GAIN = 3.0          # on every matrix but the embeddings: at the initialisers' scale greedy decoding
                    # of some families settles into one repeated token; at 3x it wanders like text

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added, not special (as in Qwen3's tokenizer): they show in decoded text, so parsers see them.
MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's thinking chat template (Qwen3-*-Thinking-2507 tokenizer_config.json): tools in the
# system turn, past assistant turns rendered without their reasoning, and a generation
# prompt that opens the reasoning block.
THINKING_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}"""

THINKING_FILE = "thinking_template.jinja"   # beside the weights; not a name mlx-lm or transformers picks up

_COMMON = {"vocab_size": VOCAB, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 32768}

# Real layouts, scaled down. What matters for the cache is each family's mix of layers.
CONFIGS: dict[str, dict] = {
    # Plain trimmable KV everywhere: the control.
    "llama": {**_COMMON, "model_type": "llama", "num_hidden_layers": 4, "intermediate_size": 256,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True},
    # Gemma 3: five sliding-window layers (RotatingKVCache of 64, wrapped by any real prompt),
    # then one global one; tied embeddings, q/k norms.
    "gemma3_text": {**_COMMON, "model_type": "gemma3_text", "num_hidden_layers": 6, "intermediate_size": 256,
                    "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "sliding_window": 64, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6},
    # gpt-oss: sliding and full attention alternating, attention sinks, a routed MoE, YaRN rope.
    "gpt_oss": {**_COMMON, "model_type": "gpt_oss", "num_hidden_layers": 4, "intermediate_size": 128,
                "head_dim": 32, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"] * 2, "rope_theta": 150000,
                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 4096},
                "rms_norm_eps": 1e-5},
    # Qwen3.5: three gated delta-net layers (ArraysCache) to one attention layer, as shipped
    # (a text_config inside the multimodal config).
    "qwen3_5": {"model_type": "qwen3_5", "text_config": {
        **_COMMON, "model_type": "qwen3_5_text", "num_hidden_layers": 4, "intermediate_size": 256,
        "head_dim": 32, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 32,
        "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True}}},
    # LFM2: short-convolution blocks (ArraysCache) around attention layers.
    "lfm2": {**_COMMON, "model_type": "lfm2", "num_hidden_layers": 4, "norm_eps": 1e-5, "conv_bias": False,
             "conv_L_cache": 3, "block_dim": 128, "block_multiple_of": 32, "block_ffn_dim_multiplier": 1.0,
             "block_auto_adjust_ff_dim": False, "block_ff_dim": 256,
             "layer_types": ["conv", "conv", "full_attention", "conv"], "rope_theta": 1_000_000.0},
}
ARCHS = tuple(CONFIGS)

_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not which but "
    "they can all were when there one more been has would so out what if about who their will up do "
    "cache prefix model token layer window state prompt answer question reason turn chat system user "
    "function value return list dict string number file path error request response server client "
    "memory disk budget entry key hash block batch step decode prefill thread process queue worker "
    "python rust swift apple metal tensor array shape float int bool none true false self class def "
    "import from yield async await lambda print range len open read write close json yaml http port"
).split()


def _corpus(n_lines: int = 6000) -> list[str]:
    """Seeded English-, code- and JSON-like lines: the BPE learns merges that real text hits."""
    rng = random.Random(SEED)
    lines = []
    for i in range(n_lines):
        kind = i % 4
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if kind == 0:
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
        elif kind == 1:
            lines.append(f"def {words[0]}_{words[1]}({words[2]}, {words[3]}=None):\n    return {words[2]} + {rng.randint(0, 999)}")
        elif kind == 2:
            lines.append(json.dumps({words[0]: words[1], words[2]: rng.randint(0, 10**6), words[3]: [rng.random()]}))
        else:
            lines.append("\n".join(f"- {w} {rng.randint(1, 99)}" for w in words[:5]))
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json, as text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(MARKERS), special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKERS])
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768,
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "clean_up_tokenization_spaces": False, "chat_template": CHATML}
    return {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2)}


def _key(name: str) -> str:
    import mlx.core as mx
    import mlx_lm

    spec = {"format": FORMAT, "name": name, "config": CONFIGS[name], "seed": SEED, "gain": GAIN, "vocab": VOCAB,
            "special": SPECIAL, "markers": MARKERS, "chatml": CHATML, "thinking": THINKING_TEMPLATE,
            "corpus": hashlib.sha256("\n".join(_corpus()).encode()).hexdigest(),
            # the model's initialisers draw from MLX's generator; its code is the recipe
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _build(name: str, out: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    import importlib

    files = dict(_tokenizer_files())
    vocab = json.loads(files["tokenizer.json"])
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    config = {**copy.deepcopy(CONFIGS[name]), "eos_token_id": ids["<|im_end|>"], "bos_token_id": None}
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(SEED)
    model = arch.Model(arch.ModelArgs.from_dict(copy.deepcopy(config)))   # some ModelArgs edit their dicts
    weights = {k: v * GAIN if v.ndim >= 2 and not k.endswith(("embed_tokens.weight", "lm_head.weight")) else v
               for k, v in tree_flatten(model.parameters())}
    head = next((k for k in weights if k.endswith("lm_head.weight")), None) \
        or next(k for k in weights if k.endswith("embed_tokens.weight"))
    rows = mx.array(sorted(ids.values()))
    w = weights[head]
    weights[head] = w.at[rows].multiply(0.01)     # specials: never the argmax, still embedded
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    mx.eval(weights)

    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for fname, text in files.items():
        (out / fname).write_text(text)
    (out / THINKING_FILE).write_text(THINKING_TEMPLATE)


def tiny_model(name: str) -> Path:
    """The directory of tiny model `name` (one of ARCHS), built on first use."""
    path = TINY_CACHE / f"{name}-{_key(name)}"
    if path.is_dir():
        return path
    TINY_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=TINY_CACHE))
    try:
        _build(name, tmp / "m")
        try:
            os.rename(tmp / "m", path)
        except OSError:
            if not path.is_dir():     # not another builder finishing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def thinking_template(name: str) -> Path:
    """The Qwen3 thinking template file of model `name`, for a model entry's `chat_template`."""
    return tiny_model(name) / THINKING_FILE


if __name__ == "__main__":
    for arch in ARCHS:
        print(arch, tiny_model(arch))
