"""Embeddings end to end: the real daemon, real workers, all-MiniLM-L6-v2 from its PyPI package.

Quality is checked against `numpy_bert.py`, an independent float64 forward over the same
safetensors; the API through the official openai SDK and the `ollama` Python library.
"""

from __future__ import annotations

import base64
import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import Daemon, smol, wait_until
from numpy_bert import NumpyBert

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors that can be compared.",
    "Paris is the capital and most populous city of France.",
    "MLX is an array framework for machine learning on Apple silicon.",
    "¿Dónde está la biblioteca?",
]
MINILM = "embedded:all-minilm-l6-v2"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("embed"), [
        {"name": "minilm", "source": MINILM, "aliases": ["embed"]},
        {"name": "minilm-open", "source": MINILM,
         "embedding": {"allow_dimensions": True, "truncate": True, "batch_tokens": 64}},
        smol("chat", sampling={"temperature": 0.0, "max_tokens": 8}),
        smol("smol-embed", kind="embedding"),
    ]) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    return daemon.openai()


@pytest.fixture(scope="module")
def reference(daemon):
    """The numpy model and the tokenizer, over the directory the worker itself loaded."""
    from tokenizers import Tokenizer

    path = Path(daemon.model_status("minilm")["worker"]["path"])
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return NumpyBert(path), tok


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_vectors_match_an_independent_numpy_forward(client, reference):
    model, tok = reference
    r = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert [d.index for d in r.data] == list(range(len(SENTENCES)))
    ids = [tok.encode(s).ids for s in SENTENCES]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    assert r.model == "minilm"
    for d, row in zip(r.data, ids):
        assert len(d.embedding) == 384
        assert cosine(d.embedding, model.embed(row)) > 1 - 1e-4
        assert abs(np.linalg.norm(d.embedding) - 1.0) < 1e-5


def test_base64_is_the_same_float32_vectors(client):
    floats = client.embeddings.create(model="minilm", input=SENTENCES[:3], encoding_format="float")
    b64 = client.embeddings.create(model="embed", input=SENTENCES[:3], encoding_format="base64")
    default = client.embeddings.create(model="minilm", input=SENTENCES[:3])   # the SDK asks for base64 itself
    raw = httpx.post(f"{client.base_url}embeddings", json={"model": "minilm", "input": SENTENCES[0],
                                                            "encoding_format": "base64"}).json()
    assert np.array_equal(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"),
                          np.float32(floats.data[0].embedding))
    for f, b, d in zip(floats.data, b64.data, default.data):      # asked for base64: the SDK leaves it a string
        assert np.array_equal(np.float32(f.embedding), np.float32(d.embedding))
        assert np.array_equal(np.float32(f.embedding), np.frombuffer(base64.b64decode(b.embedding), "<f4"))


def test_retrieval_ranks_the_right_passage_first(client):
    passages = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "The Python programming language emphasises code readability.",
        "Mount Everest is Earth's highest mountain above sea level.",
    ]
    queries = {"When was the Eiffel Tower built?": 0, "How do plants make sugar from sunlight?": 1,
               "Which language is known for readable code?": 2, "What is the tallest mountain?": 3}
    p = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=passages,
                                                                 encoding_format="float").data])
    q = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=list(queries),
                                                                 encoding_format="float").data])
    assert list((q @ p.T).argmax(axis=1)) == list(queries.values())


def test_token_ids_are_the_text_without_its_special_tokens(client, reference):
    _, tok = reference
    text = SENTENCES[1]
    ids = tok.encode(text, add_special_tokens=False).ids
    by_text = client.embeddings.create(model="minilm", input=text, encoding_format="float")
    by_ids = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    many = client.embeddings.create(model="minilm", input=[ids, ids[:3]], encoding_format="float")
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids) + 2
    assert cosine(by_ids.data[0].embedding, by_text.data[0].embedding) > 1 - 1e-6
    assert cosine(many.data[0].embedding, by_text.data[0].embedding) > 1 - 1e-6
    assert len(many.data) == 2 and many.usage.prompt_tokens == len(ids) + 3 + 4


@pytest.mark.parametrize("streams", [1, 2, 3])
@pytest.mark.parametrize("lengths", [[5], [200], [40, 9, 23], [128] * 2 + [60] * 6, [17] * 5])
def test_the_cpu_forward_equals_the_plain_one_at_every_split(daemon, reference, lengths, streams):
    """The CPU forward (token slices or batch rows per stream, attention in numpy over each
    row's real tokens) computes on every real token what the plain MLX forward (Metal's) does,
    and matches the numpy reference: one row alone (one stream, or its tokens cut across
    streams), fewer rows than streams, more, and an uneven share, whatever this machine's cores."""
    import mlx.core as mx
    from threadpoolctl import ThreadpoolController

    from daemon.embeddings.bert import Bert

    model, tok = reference
    ctl = ThreadpoolController()
    before = [c.num_threads for c in ctl.lib_controllers]
    try:
        bert = Bert(Path(daemon.model_status("minilm")["worker"]["path"]))
        bert._streams = [mx.new_stream(mx.cpu) for _ in range(streams)]
        rng = np.random.default_rng(len(lengths))
        rows = [[101, *rng.integers(1000, 20000, n - 2).tolist(), 102] for n in lengths]
        ids = np.zeros((len(rows), max(lengths)), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        mask = mx.arange(ids.shape[1])[None, :] < mx.array(lengths)[:, None]
        cpu = np.asarray(bert._forward_cpu(mx.array(ids), mask))
        with mx.stream(mx.cpu):
            plain = np.asarray(bert._forward(mx.array(ids), mask))
    finally:
        for c, n in zip(ctl.lib_controllers, before):
            c.set_num_threads(n)
    for i, n in enumerate(lengths):
        assert np.abs(cpu[i, :n] - plain[i, :n]).max() < 1e-4
    first = cpu[0, :lengths[0]].mean(axis=0)
    assert cosine(first, model.embed(rows[0])) > 1 - 1e-4


def test_a_batch_gives_each_input_what_it_gets_alone(client, daemon):
    """Padding never leaks into a vector: short inputs batched with long ones, and concurrent
    requests served together, equal the same inputs one per request."""
    long = " ".join(SENTENCES) * 3
    inputs = [SENTENCES[0], long, SENTENCES[2], "ok"]
    alone = [client.embeddings.create(model="minilm", input=s, encoding_format="float").data[0].embedding
             for s in inputs]
    together = client.embeddings.create(model="minilm", input=inputs, encoding_format="float").data
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda s: client.embeddings.create(model="minilm", input=s, encoding_format="float"),
                                 inputs * 2))
    for a, t, p in zip(alone, together, parallel):
        assert cosine(a, t.embedding) > 1 - 1e-5
        assert cosine(a, p.data[0].embedding) > 1 - 1e-5


def test_dimensions_are_refused_unless_trained_or_allowed(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input="hi", dimensions=64)
    assert e.value.status_code == 400 and e.value.body["param"] == "dimensions"
    assert "Matryoshka" in e.value.body["message"] and "allow_dimensions" in e.value.body["message"]
    same = client.embeddings.create(model="minilm", input="hi", dimensions=384, encoding_format="float")
    assert len(same.data[0].embedding) == 384
    full = np.array(client.embeddings.create(model="minilm-open", input="hi", encoding_format="float").data[0].embedding)
    for fmt in ("float", None):          # None: the SDK's default, base64 it decodes
        kw = {"encoding_format": fmt} if fmt else {}
        short = np.array(client.embeddings.create(model="minilm-open", input="hi", dimensions=64,
                                                  **kw).data[0].embedding)
        assert short.shape == (64,) and abs(np.linalg.norm(short) - 1) < 1e-5
        assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm-open", input="hi", dimensions=385)
    assert e.value.body["param"] == "dimensions"


def test_too_long_inputs_name_their_index_or_are_truncated(client):
    long = "word " * 400
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input=["short", long])
    body = e.value.body
    assert body["param"] == "input[1]" and body["code"] == "context_length_exceeded"
    assert "input[1]" in body["message"] and "256" in body["message"]
    cut = client.embeddings.create(model="minilm-open", input=["short", long], encoding_format="float")
    assert cut.usage.prompt_tokens == 3 + 256
    prefix = client.embeddings.create(model="minilm-open", input=" ".join(["word"] * 254), encoding_format="float")
    assert cosine(cut.data[1].embedding, prefix.data[0].embedding) > 1 - 1e-5


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input[1]"),
    ({"input": ["fine", 3]}, "input[1]"),
    ({"input": [[1, 2], []]}, "input[1]"),
    ({"input": [[101, 10 ** 6]]}, "input[0]"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({}, "input"),
])
def test_bad_requests_are_openai_400s_naming_the_field(daemon, body, param):
    r = httpx.post(f"{daemon.url}/v1/embeddings", json={"model": "minilm", **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="nope", input="hi")
    assert e.value.body["code"] == "model_not_found"


def test_chat_and_embeddings_each_refuse_the_other_kind_of_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in e.value.body["message"] and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="chat", input="hi")
    assert "not an embedding model" in e.value.body["message"] and e.value.body["param"] == "model"


def test_a_decoder_marked_kind_embedding_pools_its_last_token(client, daemon):
    """SmolLM2 through mlx-lm's model classes: unit vectors of its hidden size, batch-invariant."""
    inputs = ["hello there", "a somewhat longer sentence to pad the other one"]
    both = client.embeddings.create(model="smol-embed", input=inputs, encoding_format="float")
    assert daemon.model_status("smol-embed")["worker"]["embedding"]["pooling"] == "last"
    one = client.embeddings.create(model="smol-embed", input=inputs[0], encoding_format="float")
    assert len(both.data[0].embedding) == 576
    assert abs(np.linalg.norm(both.data[0].embedding) - 1) < 1e-4
    assert cosine(both.data[0].embedding, one.data[0].embedding) > 1 - 1e-4
    assert cosine(both.data[0].embedding, both.data[1].embedding) < 0.999


def test_embedding_model_has_a_status_row_and_metrics(client, daemon):
    client.embeddings.create(model="minilm", input="count me")
    st = daemon.model_status("minilm")
    assert st["serves"] == "embedding" and st["state"] == "ready" and st["pid"]
    assert st["tokens"]["prompt"] > 0 and st["tokens"]["generated"] == 0
    metrics = httpx.get(f"{daemon.url}/metrics").text
    assert 'mlxd_prompt_tokens_total{model="minilm"}' in metrics


# -- Ollama --------------------------------------------------------------------------------

def test_ollama_embed_and_embeddings(daemon, client):
    import ollama

    c = ollama.Client(host=daemon.url)
    r = c.embed(model="minilm", input=SENTENCES[:2])
    ref = client.embeddings.create(model="minilm", input=SENTENCES[:2], encoding_format="float")
    assert len(r.embeddings) == 2 and r.prompt_eval_count == ref.usage.prompt_tokens
    assert r.total_duration > 0
    for got, want in zip(r.embeddings, ref.data):
        assert np.allclose(got, want.embedding, atol=1e-6)
    single = c.embed(model="embed", input=SENTENCES[0])
    assert np.allclose(single.embeddings[0], ref.data[0].embedding, atol=1e-6)
    old = c.embeddings(model="minilm", prompt=SENTENCES[0])
    assert np.allclose(old.embedding, ref.data[0].embedding, atol=1e-6)
    long = c.embed(model="minilm", input="word " * 400)            # Ollama truncates by default
    assert long.prompt_eval_count == 256
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="minilm", input="word " * 400, truncate=False)
    assert e.value.status_code == 400 and "256" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="nope", input="hi")
    assert e.value.status_code == 404 and "nope" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="chat", input="hi")
    assert e.value.status_code == 400 and "not an embedding model" in e.value.error


def test_ollama_options_that_would_change_nothing_are_refused_not_ignored(daemon, client):
    import ollama

    c = ollama.Client(host=daemon.url)
    ref = client.embeddings.create(model="minilm", input=SENTENCES[0], encoding_format="float")
    placed = c.embed(model="minilm", input=SENTENCES[0], options={"num_thread": 2, "use_mmap": True})
    assert np.allclose(placed.embeddings[0], ref.data[0].embedding, atol=1e-6)
    for route, options in (("embed", {"temperature": 0.5}), ("embeddings", {"num_ctx": 64})):
        with pytest.raises(ollama.ResponseError) as e:
            if route == "embed":
                c.embed(model="minilm", input=SENTENCES[0], options=options)
            else:
                c.embeddings(model="minilm", prompt=SENTENCES[0], options=options)
        assert e.value.status_code == 400 and next(iter(options)) in e.value.error


def test_ollama_keep_alive_sets_the_idle_ttl_and_zero_unloads(daemon):
    import ollama

    c = ollama.Client(host=daemon.url)
    c.embed(model="minilm-open", input="stay", keep_alive="1s")
    wait_until(lambda: daemon.model_status("minilm-open")["state"] == "stopped", 30, "the 1s keep_alive to unload it")
    r = c.embed(model="minilm-open", input="back", keep_alive=0)          # loads again, then unloads at once
    assert len(r.embeddings[0]) == 384
    wait_until(lambda: daemon.model_status("minilm-open")["state"] == "stopped", 30, "keep_alive 0 to unload it")
    c.embed(model="minilm-open", input="again", keep_alive=-1)
    assert daemon.model_status("minilm-open")["state"] == "ready"
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="minilm", input="x", keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error


def test_hostile_bodies_get_a_200_or_an_error_in_the_routes_shape(daemon):
    """Whatever JSON arrives as `input`, `dimensions` or `keep_alive`: 200 or a 4xx error object, never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 40000), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=12))
    junk = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=8)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["/v1/embeddings", "/api/embed"]), input=junk, extra=st.dictionaries(
        st.sampled_from(["dimensions", "encoding_format", "truncate", "keep_alive", "user"]), junk, max_size=2))
    def check(route, input, extra):
        extra.pop("keep_alive", None) if route == "/v1/embeddings" else None
        if extra.get("keep_alive") == 0:
            extra.pop("keep_alive")            # an unload per example would only slow the run down
        r = httpx.post(daemon.url + route, json={"model": "minilm", "input": input, **extra}, timeout=120)
        assert r.status_code in (200, 400), (r.status_code, r.text)
        body = r.json()
        if r.status_code == 400:
            err = body["error"]
            assert isinstance(err, str) if route == "/api/embed" else isinstance(err["message"], str)
        elif route == "/v1/embeddings":
            assert len(body["data"]) >= 1
    check()
    assert daemon.model_status("minilm")["restarts"] == 0
