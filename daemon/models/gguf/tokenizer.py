"""tokenizer.json (and the HF config files beside it) from a GGUF's vocabulary.

Two families, as in llama.cpp: "gpt2" (byte-level BPE with merges, split first by the
pre-tokenizer regex llama.cpp names in `tokenizer.ggml.pre`) and "llama" (SentencePiece
BPE with byte fallback: scores, no merges). The second is built like HF's converters do:
merges derived from the vocabulary in score order, spaces spelled "▁".
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_SPACE = "▁"

# llama.cpp's pre-tokenizer names -> the split regex of the HF tokenizer.json it stands for.
_SPLIT = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_GPT2_PRE = ("gpt2", "gpt-2", "smollm", *_SPLIT)


def build(get, context_length: int):
    """(Tokenizer, tokenizer_config, special_tokens_map) for the GGUF metadata `get`."""
    kind = get("tokenizer.ggml.model")
    tokens = list(get("tokenizer.ggml.tokens"))
    types = list(get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if kind == "gpt2":
        tok = _gpt2(get, tokens)
    elif kind == "llama":
        tok, tokens = _spm(get, tokens, types)
    else:
        raise ValueError(f"tokenizer {kind!r} is not supported (only 'gpt2' byte-level BPE and 'llama' SentencePiece)")

    # Control tokens are special (skipped when decoding with skip_special_tokens);
    # user-defined ones are matched whole but kept in decoded text, as in llama.cpp.
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=t.startswith(_SPACE) and kind == "llama")
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def token(key):
        i = get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    add_bos = bool(get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
    bos = [specials["bos_token"]] if add_bos and "bos_token" in specials else []
    eos = [specials["eos_token"]] if add_eos and "eos_token" in specials else []
    if bos or eos:
        tok.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos,
            pair=bos + ["$A"] + eos + bos + ["$B"] + eos,
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(bos + eos)],
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if template := get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = template
    special_map = {**specials, "additional_special_tokens": [t.content for t in control if t.content not in specials.values()]}
    return tok, tokenizer_config, special_map


def _gpt2(get, tokens):
    pre = get("tokenizer.ggml.pre", "gpt2")
    if pre not in _GPT2_PRE:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (only {', '.join(_GPT2_PRE)})")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in _SPLIT:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    else:
        # ByteLevel's own regex is GPT-2's; "smollm" splits digits one by one first.
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
        tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm(get, tokens, types):
    # llama.cpp keeps SentencePiece's user-defined space runs as plain spaces; the model
    # sees text with spaces already spelled "▁", so they are respelled to match.
    tokens = [t.replace(" ", _SPACE) if ty == _USER_DEFINED and t.strip(" ") == "" else t
              for t, ty in zip(tokens, types)]
    scores = get("tokenizer.ggml.scores")
    scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(tokens, scores, vocab),
                               unk_token=tokens[unk_id] if unk_id is not None else None,
                               fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", _SPACE)]
    decode = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if get("tokenizer.ggml.add_space_prefix", True):
        # llama.cpp prefixes a space to the text and to each piece after a special token.
        steps.insert(0, normalizers.Prepend(_SPACE))
        decode.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(decode)
    return tok, tokens


def _merges(tokens, scores, vocab):
    """Every split of a piece into two pieces, best-scored pieces first (HF's SentencePieceExtractor)."""
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
