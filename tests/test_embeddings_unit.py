"""Pure logic of embeddings: spec detection, pooling, special tokens, batching by length, keep_alive."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest

from daemon.api.errors import APIError
from daemon.api.ollama_ttl import FOREVER, parse
from daemon.config import Embedding, ModelConfig
from daemon.embeddings.spec import SpecError, detect, is_embedding_dir
from daemon.worker.engine import RequestError


def write(path: Path, files: dict) -> Path:
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


BERT = {"model_type": "bert", "hidden_size": 384, "max_position_embeddings": 512}
QWEN = {"model_type": "qwen3", "hidden_size": 1024, "max_position_embeddings": 32768}
MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
           {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def st_dir(tmp_path, pooling: dict, modules=MODULES, config=BERT, window=256, readme=None) -> Path:
    files = {"config.json": config, "modules.json": modules, "1_Pooling/config.json": pooling,
             "sentence_bert_config.json": {"max_seq_length": window, "do_lower_case": False}}
    if readme:
        files["README.md"] = readme
    return write(tmp_path, files)


def test_sentence_transformers_dir_gives_pooling_normalize_and_window(tmp_path):
    d = st_dir(tmp_path, {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    assert is_embedding_dir(d)
    s = detect(d)
    assert (s.arch, s.pooling, s.normalize, s.max_seq_length, s.dimensions) == ("bert", "mean", True, 256, 384)
    assert not s.matryoshka and s.sentence_transformers


@pytest.mark.parametrize("flags, pooling", [({"pooling_mode_cls_token": True}, "cls"),
                                            ({"pooling_mode_lasttoken": True}, "last"),
                                            ({"pooling_mode_mean_tokens": True}, "mean")])
def test_each_pooling_mode_is_read(tmp_path, flags, pooling):
    assert detect(st_dir(tmp_path, flags, config=QWEN)).pooling == pooling


def test_no_normalize_module_means_raw_vectors(tmp_path):
    assert not detect(st_dir(tmp_path, {"pooling_mode_cls_token": True}, modules=MODULES[:2])).normalize


@pytest.mark.parametrize("flags, what", [({"pooling_mode_max_tokens": True}, "pooling_mode_max_tokens"),
                                         ({}, "no pooling mode"),
                                         ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
                                          "several pooling modes")])
def test_pooling_we_do_not_run_is_an_error_that_says_so(tmp_path, flags, what):
    with pytest.raises(SpecError, match=what):
        detect(st_dir(tmp_path, flags))


def test_unknown_modules_are_refused(tmp_path):
    modules = [*MODULES, {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(SpecError, match="Dense"):
        detect(st_dir(tmp_path, {"pooling_mode_mean_tokens": True}, modules=modules))


def test_plain_decoder_dir_defaults_to_last_token_normalised(tmp_path):
    d = write(tmp_path, {"config.json": QWEN})
    assert not is_embedding_dir(d)
    s = detect(d)
    assert (s.arch, s.pooling, s.normalize, s.max_seq_length, s.dimensions) == ("decoder", "last", True, 32768, 1024)


def test_the_entry_overrides_the_directory(tmp_path):
    d = st_dir(tmp_path, {"pooling_mode_mean_tokens": True})
    s = detect(d, Embedding(pooling="cls", normalize=False, max_seq_length=128))
    assert (s.pooling, s.normalize, s.max_seq_length) == ("cls", False, 128)
    with pytest.raises(SpecError, match="512 positions"):
        detect(d, Embedding(max_seq_length=1024))


def test_a_model_card_naming_matryoshka_allows_dimensions(tmp_path):
    d = st_dir(tmp_path, {"pooling_mode_mean_tokens": True}, readme="---\ntags:\n- matryoshka\n---\n# A model")
    assert detect(d).matryoshka


def test_embedding_kind_and_distributed_do_not_mix():
    with pytest.raises(ValueError, match="embedding model cannot be distributed"):
        ModelConfig(name="e", source="x", kind="embedding", distributed={"hosts": ["127.0.0.1", "127.0.0.2"]})


def test_embedding_settings_change_the_worker_key():
    a, b = ModelConfig(name="e", source="x"), ModelConfig(name="e", source="x", embedding={"truncate": True})
    assert a.worker_key() != b.worker_key()


# -- pooling (MLX on the CPU is fine here: pure arithmetic) ----------------------------------

def test_pooling_ignores_padding():
    import mlx.core as mx

    from daemon.embeddings.models import pool

    h = mx.array(np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2))
    lens = mx.array([3, 1])
    mask = mx.arange(3)[None, :] < lens[:, None]
    assert np.allclose(np.array(pool(h, mask, lens, "mean")), [[2, 3], [6, 7]])
    assert np.allclose(np.array(pool(h, mask, lens, "cls")), [[0, 1], [6, 7]])
    assert np.allclose(np.array(pool(h, mask, lens, "last")), [[4, 5], [6, 7]])


# -- the engine's bookkeeping, with a tokenizer built here and a recording embedder -----------

def bert_like_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": 4 + i for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


class Recorder:
    """Returns each row's first token id and length as its vector, and remembers every batch."""
    vocab_size = 44

    def __init__(self):
        self.batches = []

    def __call__(self, rows):
        self.batches.append([len(r) for r in rows])
        return np.array([[r[1], len(r), 1.0] for r in rows], dtype=np.float32)


def engine(window=8, **settings):
    from daemon.embeddings.engine import EmbedEngine
    from daemon.embeddings.spec import EmbedSpec

    spec = EmbedSpec(arch="bert", model_type="bert", pooling="mean", normalize=True, max_seq_length=window,
                     dimensions=3, matryoshka=False, sentence_transformers=True)
    return EmbedEngine(Recorder(), bert_like_tokenizer(), spec, Embedding(**settings), "m")


def text(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def run(e) -> list[dict]:
    out = []
    while e.busy:
        out += e.step()
    return out


def vectors(ev: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(ev["data"]), "<f4").reshape(ev["count"], ev["dimensions"])


def test_token_ids_get_the_same_special_tokens_as_text():
    e = engine()
    assert e.affixes.prefix == [2] and e.affixes.suffix == [3]
    assert e.submit({"id": "a", "embed": {"input": [text(2), [4, 5]]}})["prompt_tokens"] == 8
    evs = run(e)
    got = vectors(evs[0])
    assert got.tolist() == [[4, 4, 1], [4, 4, 1]]


def test_too_long_is_a_400_naming_the_index_or_cut_to_the_window():
    e = engine(window=6)
    with pytest.raises(RequestError) as err:
        e.submit({"id": "a", "embed": {"input": [text(2), text(5)]}})
    assert err.value.param == "input[1]" and err.value.code == "context_length_exceeded"
    with pytest.raises(RequestError) as err:
        e.submit({"id": "a", "embed": {"input": [text(5)]}})
    assert err.value.param == "input"
    assert not e.jobs and not e.queue
    assert e.submit({"id": "b", "embed": {"input": [text(5)], "truncate": True}})["prompt_tokens"] == 6
    run(e)
    assert e.embedder.batches == [[6]]


def test_an_input_with_no_tokens_is_a_400_naming_it():
    """A tokenizer with no special tokens makes "" an empty row: refused, not a failed batch."""
    e = engine()
    e.tokenizer.post_processor = None
    e.affixes.prefix, e.affixes.suffix = [], []
    with pytest.raises(RequestError) as err:
        e.submit({"id": "a", "embed": {"input": [text(2), ""]}})
    assert err.value.param == "input[1]" and "no tokens" in str(err.value)
    assert not e.jobs and not e.queue


def test_inputs_of_all_requests_are_batched_by_length_within_batch_tokens():
    e = engine(window=32, batch_tokens=24)
    e.submit({"id": "long", "embed": {"input": [text(10), text(1)]}})          # 12 and 3 tokens
    e.submit({"id": "short", "embed": {"input": [text(1), text(2), text(10)]}})  # 3, 4 and 12
    evs = run(e)
    # the oldest item (12 tokens) goes first, with the other 12 (24 padded tokens); then the short ones
    assert e.embedder.batches == [[12, 12], [3, 3, 4]]
    done = {ev["id"]: vectors(ev) for ev in evs if ev["op"] == "embedding"}
    assert done["long"][:, 1].tolist() == [12, 3] and done["short"][:, 1].tolist() == [3, 4, 12]
    assert [ev["op"] for ev in evs] == ["embedding", "done", "embedding", "done"]


def test_dimensions_are_checked_and_renormalised():
    e = engine(allow_dimensions=True)
    with pytest.raises(RequestError, match="from 1 to 3"):
        e.submit({"id": "a", "embed": {"input": ["w1"], "dimensions": 4}})
    e.submit({"id": "a", "embed": {"input": ["w1"], "dimensions": 2}})
    v = vectors(run(e)[0])
    assert v.shape == (1, 2) and math.isclose(float(np.linalg.norm(v)), 1.0, rel_tol=1e-6)
    with pytest.raises(RequestError, match="Matryoshka"):
        engine().submit({"id": "b", "embed": {"input": ["w1"], "dimensions": 2}})


def test_cancel_drops_the_request_and_others_go_on():
    e = engine()
    e.submit({"id": "a", "embed": {"input": ["w1", "w2 w3"]}})
    e.submit({"id": "b", "embed": {"input": ["w4"]}})
    assert e.cancel("a")["finish_reason"] == "cancelled"
    evs = run(e)
    assert [(ev["op"], ev["id"]) for ev in evs] == [("embedding", "b"), ("done", "b")]


def test_a_failing_batch_fails_its_requests_only():
    e = engine(window=32, batch_tokens=16)
    e.submit({"id": "a", "embed": {"input": [text(10)]}})
    e.submit({"id": "b", "embed": {"input": [text(1)]}})
    calls = []

    def flaky(rows):
        calls.append(rows)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.ones((len(rows), 3), dtype=np.float32)
    flaky.vocab_size = 44
    e.embedder = flaky
    evs = run(e)
    assert [(ev["op"], ev["id"]) for ev in evs] == [("error", "a"), ("embedding", "b"), ("done", "b")]
    assert evs[0]["status"] == 500 and e.internal_errors == 1


def test_generation_payloads_are_refused_by_name():
    with pytest.raises(RequestError, match="'m' is an embedding model") as err:
        engine().submit({"id": "a", "messages": [{"role": "user", "content": "hi"}]})
    assert err.value.param == "model"


# -- Ollama's keep_alive -----------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [(None, None), (0, 0.0), ("0", 0.0), (300, 300.0), ("5m", 300.0),
                                            ("1h30m", 5400.0), ("1.5s", 1.5), ("300ms", 0.3), (-1, FOREVER),
                                            ("-1m", FOREVER), ("10", 10.0)])
def test_keep_alive_durations(value, seconds):
    got = parse(value)
    assert got == seconds if seconds is None or seconds == FOREVER else math.isclose(got, seconds)


@pytest.mark.parametrize("value", ["soon", "5 m", "", True, [1], "m5"])
def test_keep_alive_nonsense_is_a_400(value):
    with pytest.raises(APIError) as e:
        parse(value)
    assert e.value.status == 400 and e.value.param == "keep_alive"


def test_inputs_far_apart_in_length_are_not_padded_together():
    e = engine(window=64)
    e.submit({"id": "a", "embed": {"input": [text(1), text(40), text(38), text(2)]}})     # 3, 42, 40, 4 tokens
    run(e)
    assert sorted(map(sorted, e.embedder.batches)) == [[3, 4], [40, 42]]
