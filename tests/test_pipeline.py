"""Pipeline stages over MLX distributed: two ranks on loopback (ring backend) against one process.

Each group run starts two real ranks (tests/pipeline_rank.py) that load only their layers,
prefill and decode greedily; the tokens must be the single process's exactly. The ranks
spin a core each while they wait on each other, so the runs are few and short.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import tiny_gguf
from conftest import TEST_CACHE
from daemon.models import resolve_model
from daemon.models.pipeline import Stage, load_stage
from daemon.worker.cache.prefix import PrefixCache
from pipeline_rank import run_group, run_single

TEXT = "The three primary colors are red, yellow and blue. Mixing red and blue gives"


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("embedded:smollm2", dtype="float32", cache_dir=TEST_CACHE).path


def test_llama_uneven_split_matches_single_process_and_its_shards_rebuild_its_cache(smollm2, tmp_path):
    """SmolLM2 (llama, which mlx-lm does not pipeline) split 20/10: the same greedy tokens, each
    rank holding only its layers; and rank 1's cache shard followed by rank 0's (as each rank's
    prefix cache wrote them, to one shared directory) is exactly the single process's cache."""
    spec = {"path": str(smollm2), "text": TEXT, "max_tokens": 6, "cache_dir": str(tmp_path / "prefix")}
    single = run_single(spec, tmp_path / "single")
    ranks = run_group({**spec, "split": [20, 10]}, tmp_path / "group")

    assert [r["stage"] for r in ranks] == ["r0of2-L10-29", "r1of2-L0-9"]
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single["tokens"]
    assert len(set(single["tokens"])) > 2          # a real continuation, not a stuck token
    # Only its own layers are materialised: 20 of 30 layers (plus the shared embedding) on
    # rank 0, 10 on rank 1; single ~538 MB, embedding ~113 MB.
    assert ranks[1]["loaded"] < ranks[0]["loaded"] < 0.8 * single["loaded"]
    assert ranks[1]["loaded"] < 0.5 * single["loaded"]

    key = single["key"]
    assert ranks[0]["key"] == ranks[1]["key"] == key     # the same key on every rank
    n = single["prompt_tokens"]

    def shard(stage):
        pc = PrefixCache(None, fingerprint="e" * 64, root=tmp_path / "prefix", memory_budget=1 << 30,
                         disk_budget=1 << 30, stage=stage, follower=stage is not None)
        try:
            return pc.fetch_key(key, n)
        finally:
            pc.close()

    whole, r0, r1 = shard(None), shard(Stage(0, 2, 10, 30)), shard(Stage(1, 2, 0, 10))
    assert (len(r1), len(r0), len(whole)) == (10, 20, 30)
    for mine, ref in zip(r1 + r0, whole):
        assert mine.offset == ref.offset == n
        for a, b in zip(mine.keys_and_values(), ref.keys_and_values()):
            assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_tiny_models_match_single_process(arch, tmp_path):
    """qwen2 (mlx-lm's own PipelineMixin), qwen3 (ours) and gemma3_text (ours: sliding-window and
    global layers, the window crossed by the prompt) from random-weight GGUFs through our importer."""
    tiny_gguf.write(tmp_path / f"{arch}.gguf", arch)
    path = resolve_model(str(tmp_path / f"{arch}.gguf"), dtype="float32", cache_dir=tmp_path / "cache").path
    # 24 tokens prefilled, then 16 in one forward pass (window 8: its masks cross the window).
    spec = {"path": str(path), "prompt": [(i * 37) % 200 + 3 for i in range(40)], "tail": 16, "max_tokens": 8}
    single = run_single(spec, tmp_path / "single")
    ranks = run_group(spec, tmp_path / "group")
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    half = layers // 2
    assert [r["stage"] for r in ranks] == [f"r0of2-L{half}-{layers - 1}", f"r1of2-L0-{half - 1}"]
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single["tokens"]
    # Random weights echo the input through the residual, so the argmax alone would miss a wrong
    # mask: the logits of the 16 tokens must agree too.
    assert ranks[0]["top"][0] == single["top"][0]
    assert np.allclose(ranks[0]["top"][1], single["top"][1], rtol=1e-5, atol=1e-5)


def test_an_architecture_that_cannot_pipeline_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"wte.weight": mx.zeros((4, 4))})
    with pytest.raises(ValueError, match="'gpt2' cannot be split into pipeline stages"):
        load_stage(tmp_path, mx.distributed.init())


def test_a_split_that_does_not_fit_the_group_is_refused(smollm2):
    with pytest.raises(ValueError, match="split has 2 entries for group size 1"):
        load_stage(smollm2, mx.distributed.init(), split=[15, 15])
    with pytest.raises(ValueError, match="must be positive and sum to 30 layers"):
        load_stage(smollm2, mx.distributed.init(), split=[29])


def test_stage_tag():
    assert Stage(1, 2, 0, 15).tag == "r1of2-L0-14"
