"""A model served by a 2-rank pipeline group on loopback: the same tokens as one process,
continuous batching across ranks, a rank's death restarts the group, reload and shutdown
converge like any model. Plus the pure logic: config validation and the remote command."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import Daemon, alive
from daemon import ranks
from daemon.config import ConfigError, Distributed, parse_config

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 42], [100 + i for i in range(37)], [7] * 20]




def models(**group) -> list[dict]:
    common = {"source": "embedded:smollm2", "sampling": {"max_tokens": 12}, "engine": {"prefill_step_size": 64}}
    return [{"name": "grp", "distributed": {"hosts": ["127.0.0.1", "127.0.0.1"], **group}, **common},
            {"name": "one", **common, "prefix_cache": {"enabled": False}}]


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("group"), models()) as d:
        yield d


@pytest.fixture(scope="module")
def client(group):
    return group.openai()


def complete(c: OpenAI, model: str, prompt, **kw):
    r = c.completions.create(model=model, prompt=prompt, temperature=kw.pop("temperature", 0), **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def layer_count(st: dict) -> int:
    return json.loads((Path(st["worker"]["path"]) / "config.json").read_text())["num_hidden_layers"]


def stages_on_disk(d: Daemon) -> set[str]:
    """The stage tags of the prefix-cache namespaces the ranks opened ("...-r1of2-L0-14")."""
    return {"-".join(p.name.split("-")[-3:]) for p in (d.cache_dir / "prefix").iterdir() if "-r" in p.name}


def test_group_gives_the_single_process_tokens(group, client):
    st = group.model_status("grp")
    # No split: the layers are halved, and rank 0 runs the last half.
    n = layer_count(st)
    assert st["worker"]["group"] == {"rank": 0, "size": 2, "stage": f"r0of2-L{n // 2}-{n - 1}"}
    assert stages_on_disk(group) == {f"r0of2-L{n // 2}-{n - 1}", f"r1of2-L0-{n // 2 - 1}"}
    (rank1,) = st["worker"]["ranks"]
    assert rank1["rank"] == 1 and alive(rank1["pid"])
    for p in PROMPTS:
        assert complete(client, "grp", p) == complete(client, "one", p)
    # A seeded sampled request draws the same numbers on every rank (and as one process does).
    kw = dict(temperature=0.9, max_tokens=12)
    assert complete(client, "grp", PROMPTS[0], seed=1234, **kw) == complete(client, "one", PROMPTS[0], seed=1234, **kw)
    # ...and it is sampled, not greedy: other seeds draw other tokens on the group.
    greedy = complete(client, "grp", PROMPTS[0], max_tokens=12)[0]
    draws = {complete(client, "grp", PROMPTS[0], seed=s, **kw)[0] for s in range(4)}
    assert len(draws - {greedy}) >= 2, (greedy, draws)
    # A grammar masks the logits on every rank alike.
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
    msgs = [{"role": "user", "content": "Give me a pirate name as JSON."}]
    answers = [client.chat.completions.create(model=m, messages=msgs, max_tokens=16, temperature=0,
                                              response_format=fmt).choices[0].message.content for m in ("grp", "one")]
    assert answers[0] == answers[1] and answers[0].lstrip().startswith('{') and '"name"' in answers[0]
    # Each rank's memory is reported; both ranks run here, so the model's memory is their sum.
    time.sleep(2.5)
    st = group.model_status("grp")
    assert [r["rank"] for r in st["ranks"]] == [0, 1] and all(r["memory_bytes"] > 0 for r in st["ranks"])
    assert st["memory_bytes"] == sum(r["memory_bytes"] for r in st["ranks"])


def test_requests_join_leave_and_cancel_mid_batch(group, client):
    expect = {i: complete(client, "one", p, max_tokens=16) for i, p in enumerate(PROMPTS)}
    got, errors = {}, []

    def run(i: int, delay: float) -> None:
        time.sleep(delay)
        try:
            got[i] = complete(client, "grp", PROMPTS[i], max_tokens=16)
        except Exception as e:      # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, 0.5 * i)) for i in (0, 2, 3)]
    for t in threads:
        t.start()
    # One more stream joins and is cancelled after a few tokens, while the others run.
    stream = client.completions.create(model="grp", prompt=PROMPTS[1], max_tokens=200, temperature=0, stream=True)
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()
    for t in threads:
        t.join(300)
    assert not errors
    assert got == {i: expect[i] for i in (0, 2, 3)}
    # The batch is consistent on every rank afterwards.
    assert complete(client, "grp", PROMPTS[1]) == complete(client, "one", PROMPTS[1])


def chat(c: OpenAI, model: str, messages: list[dict]):
    r = c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    return r.choices[0].message.content, r.usage


def cache_stats(d: Daemon) -> dict:
    return httpx.get(f"{d.url}/v1/cache/stats", timeout=30).json()["models"]["grp"]


def unload(d: Daemon, name: str) -> None:
    httpx.post(f"{d.url}/v1/models/{name}/unload", timeout=120).raise_for_status()
    deadline = time.monotonic() + 120
    while d.model_status(name)["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_follow_up_turn_hits_the_group_cache_also_after_a_restart(group, client):
    msgs = [{"role": "user", "content": "List three colours of the rainbow, please."}]
    answer, first = chat(client, "grp", msgs)
    assert answer == chat(client, "one", msgs)[0]
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And two more?"}]
    answer, second = chat(client, "grp", msgs)
    assert second.prompt_tokens_details.cached_tokens >= first.prompt_tokens + first.completion_tokens - 4
    assert answer == chat(client, "one", msgs)[0]
    # The group stops (every rank flushes its shard to disk) and loads again: the disk tier hits.
    unload(group, "grp")
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Thanks. One more?"}]
    answer, third = chat(client, "grp", msgs)
    assert third.prompt_tokens_details.cached_tokens >= second.prompt_tokens + second.completion_tokens - 4
    assert answer == chat(client, "one", msgs)[0]
    assert cache_stats(group)["disk_hit_tokens"] > 0


def test_a_hit_rank_1_cannot_serve_is_a_miss_with_the_same_answer(group, client):
    msgs = [{"role": "user", "content": "Name a large animal that lives in the sea."}]
    answer, first = chat(client, "grp", msgs)
    unload(group, "grp")
    # Rank 1's shards are lost (a disk swapped, a write dropped); rank 0's are intact.
    shards = [p for p in (group.cache_dir / "prefix").glob("*-r1of2-*/*") if p.suffix in (".json", ".safetensors")]
    assert shards
    for p in shards:
        p.unlink()
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "How big is it?"}]
    answer, second = chat(client, "grp", msgs)
    assert second.prompt_tokens_details.cached_tokens == 0
    assert answer == chat(client, "one", msgs)[0]


def test_killing_rank_1_mid_stream_fails_the_stream_and_the_group_comes_back(group, client):
    st = group.model_status("grp")
    pid, rank1 = st["pid"], st["worker"]["ranks"][0]["pid"]
    stream = client.completions.create(model="grp", prompt=PROMPTS[2], max_tokens=400, temperature=0, stream=True)
    with pytest.raises(openai.APIError) as e:
        for n, _ in enumerate(stream):
            if n == 2:
                os.kill(rank1, signal.SIGKILL)
    assert "rank 1" in str(e.value) and "SIGKILL" in str(e.value)
    st = group.wait_restarted("grp", pid)
    assert st["restarts"] >= 1 and st["worker"]["ranks"][0]["pid"] != rank1
    assert not alive(pid)
    assert complete(client, "grp", PROMPTS[0]) == complete(client, "one", PROMPTS[0])
    # Rank 0 dying takes its followers with it: the daemon reaps them, and the group comes back.
    pid, rank1 = st["pid"], st["worker"]["ranks"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    st = group.wait_restarted("grp", pid)
    assert not alive(rank1) and st["worker"]["ranks"][0]["pid"] != rank1
    assert complete(client, "grp", PROMPTS[1]) == complete(client, "one", PROMPTS[1])


def test_reload_of_the_group_entry_restarts_every_rank(group, client):
    st = group.model_status("grp")
    old = [st["pid"], st["worker"]["ranks"][0]["pid"]]
    assert st["worker"]["group"]["stage"] != "r0of2-L16-29"
    group.write_config(models(split=[14, 16]))
    st = group.wait_restarted("grp", old[0], timeout=300)     # raises unless ready in a new process
    assert st["pid"] is not None and st["pid"] != old[0] and st["worker"]["ranks"][0]["pid"] != old[1]
    # The new split took effect: rank 0 runs the last 14 layers, rank 1 the first 16.
    n = layer_count(st)
    assert st["worker"]["group"]["stage"] == f"r0of2-L{n - 14}-{n - 1}"
    assert complete(client, "grp", PROMPTS[3]) == complete(client, "one", PROMPTS[3])
    assert f"r1of2-L0-{n - 14 - 1}" in stages_on_disk(group)
    deadline = time.monotonic() + 60
    while any(alive(p) for p in old) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in old)


def test_shutdown_is_clean(group, client):
    st = group.model_status("grp")
    pids = [st["pid"], st["worker"]["ranks"][0]["pid"]]
    complete(client, "grp", PROMPTS[0])
    before = len(group.log_path.read_text(errors="replace"))
    assert group.stop() == 0
    assert not any(alive(p) for p in pids)
    log = group.log_path.read_text(errors="replace")[before:]
    for bad in ("Traceback", "rank 0 of the group is gone", "lost rank", "peer", "ERROR"):
        assert bad not in log, bad


# -- pure logic ------------------------------------------------------------------------------


def _config(dist: str) -> str:
    return f"models:\n  - name: m\n    source: embedded:smollm2\n    distributed: {dist}\n"


@pytest.mark.parametrize("dist, expect", [
    ("{hosts: [127.0.0.1, localhost]}", "is not an IP address"),
    ("{hosts: [127.0.0.1]}", "at least 2 items"),
    ("{hosts: [127.0.0.1, 10.0.0.2], split: [30]}", "split has 1 entries for 2 hosts"),
    ("{hosts: [127.0.0.1, 10.0.0.2], split: [0, 30]}", "greater than 0"),
    ("{hosts: [127.0.0.1, 10.0.0.2], backend: mpi}", "'ring' or 'jaccl'"),
])
def test_bad_distributed_blocks_are_clear_errors(dist, expect):
    with pytest.raises(ConfigError) as e:
        parse_config(_config(dist), "c.yaml")
    assert "distributed" in str(e.value) and expect in str(e.value)


def test_speculation_on_a_group_is_refused_not_ignored():
    text = _config("{hosts: [127.0.0.1, 127.0.0.1]}") + "    engine: {speculative: {mode: prompt_lookup}}\n"
    with pytest.raises(ConfigError, match="engine.speculative is not supported with distributed"):
        parse_config(text, "c.yaml")


@pytest.mark.skipif(sys.platform == "darwin", reason="jaccl is allowed on macOS")
def test_jaccl_is_macos_only():
    with pytest.raises(ConfigError, match="jaccl needs macOS"):
        parse_config(_config("{hosts: [127.0.0.1, 10.0.0.2], backend: jaccl}"), "c.yaml")


def test_a_changed_distributed_block_is_a_changed_worker():
    a = parse_config(_config("{hosts: [127.0.0.1, 127.0.0.1]}")).models[0]
    b = parse_config(_config("{hosts: [127.0.0.1, 127.0.0.1], split: [10, 20]}")).models[0]
    assert a.worker_key() != b.worker_key()


def test_remote_rank_command_runs_the_worker_over_ssh_with_the_hostfile():
    plan = ranks.Plan(("127.0.0.1", "198.51.100.7"), (40001, 32324), "127.0.0.1:40002", "ring")
    assert plan.hostfile == '[["127.0.0.1:40001"], ["198.51.100.7:32324"]]'
    args = ranks.follower_args(1, '{"name": "m"}', "/c", plan.doorbell, [])
    cmd = ranks.remote_command("198.51.100.7", 1, plan, "/venv/bin/python", "/srv/mlxd", args)
    assert cmd[:2] == ["ssh", "-tt"] and cmd[-2] == "198.51.100.7"
    script = cmd[-1]
    assert script.index("cd /srv/mlxd") < script.index("MLX_HOSTFILE=$(mktemp)") < script.index("exec ")
    assert "export MLX_RANK=1;" in script
    assert """'[["127.0.0.1:40001"], ["198.51.100.7:32324"]]'""" in script
    assert script.endswith("exec /venv/bin/python -m daemon.worker --rank 1 --doorbell 127.0.0.1:40002 "
                           """--model '{"name": "m"}' --cache-dir /c""")


def test_rank_0_must_run_on_this_machine():
    with pytest.raises(ValueError, match="not an address of this machine"):
        ranks.plan(Distributed(hosts=("198.51.100.7", "127.0.0.1")))
    plan = ranks.plan(Distributed(hosts=("127.0.0.1", "127.0.0.1")))
    assert len(set(plan.ports)) == 2
    assert plan.env(1, {"MLX_HOSTFILE": "/h"}) == {"MLX_RANK": "1", "MLX_HOSTFILE": "/h"}
    with pytest.raises(ValueError, match="which 198.51.100.7 cannot reach"):
        ranks.plan(Distributed(hosts=("127.0.0.1", "198.51.100.7")))


def test_jaccl_ranks_get_the_device_list_and_the_coordinator():
    plan = ranks.Plan(("10.0.0.1", "10.0.0.2"), (40001, 32324), "10.0.0.1:40002", "jaccl",
                      ((None, "rdma_en3"), ("rdma_en3", None)))
    assert plan.files == {"MLX_IBV_DEVICES": '[[null, "rdma_en3"], ["rdma_en3", null]]'}
    assert plan.env(0, {"MLX_IBV_DEVICES": "/d"}) == {
        "MLX_RANK": "0", "MLX_IBV_DEVICES": "/d", "MLX_JACCL_COORDINATOR": "10.0.0.1:40001"}
    script = ranks.remote_command("10.0.0.2", 1, plan, "python3", "/srv", ["-m", "daemon.worker"])[-1]
    assert "MLX_IBV_DEVICES=$(mktemp)" in script and "MLX_HOSTFILE" not in script
    assert "export MLX_JACCL_COORDINATOR=10.0.0.1:40001;" in script


@pytest.mark.parametrize("dist, expect", [
    ("{hosts: [127.0.0.1, 10.0.0.2], rdma: [[null, a], [a, null]]}", "rdma is for backend jaccl only"),
])
def test_rdma_belongs_to_jaccl(dist, expect):
    with pytest.raises(ConfigError, match=expect):
        parse_config(_config(dist), "c.yaml")


def test_an_unreachable_rank_host_is_named():
    closed = ranks.free_port("127.0.0.1")      # nothing listens there (a sandbox may answer any remote address)
    with pytest.raises(ValueError, match=f"distributed host 127.0.0.1 is unreachable over ssh \\(port {closed}\\)"):
        ranks.check_reachable("127.0.0.1", timeout=2, port=closed)


def test_jaccl_on_macos_needs_a_full_rdma_matrix(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ConfigError, match="2 rows of 2 RDMA device names"):
        parse_config(_config("{hosts: [127.0.0.1, 10.0.0.2], backend: jaccl}"), "c.yaml")
    with pytest.raises(ConfigError, match="null only where i == j"):
        parse_config(_config("{hosts: [127.0.0.1, 10.0.0.2], backend: jaccl, rdma: [[null, null], [a, null]]}"))
    ok = parse_config(_config("{hosts: [127.0.0.1, 10.0.0.2], backend: jaccl, rdma: [[null, a], [b, null]]}"))
    assert ok.models[0].distributed.rdma == ((None, "a"), ("b", None))
