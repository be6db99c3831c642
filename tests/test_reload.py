"""Hot reload: edit the YAML, the daemon converges; untouched models never notice."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from conftest import Daemon, in_order, smol, wait_until

A = smol("a", sampling={"temperature": 0.0, "max_tokens": 4})


def models_ids(d: Daemon) -> set[str]:
    return {m["id"] for m in httpx.get(f"{d.url}/v1/models", timeout=10).json()["data"]}


def save_atomically(path, text: str) -> None:
    """How vim/VS Code save: write a temp file, rename it over the config."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, [A], server={"drain_timeout": 20})
    d.start()
    yield d
    d.stop()


class Load:
    """A steady stream of requests to model `a`, counting failures."""

    def __init__(self, d: Daemon):
        self.client = OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.ok, self.failed, self.stop = 0, [], threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.stop.is_set():
            try:
                r = self.client.chat.completions.create(model="a", max_tokens=4,
                                                        messages=[{"role": "user", "content": "Hi"}])
                assert r.choices[0].message.content is not None
                self.ok += 1
            except Exception as e:
                self.failed.append(repr(e))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(120)


def test_twenty_edits_under_load_leave_model_a_untouched(daemon):
    pid_a = daemon.model_status("a")["pid"]
    b = smol("b", sampling={"max_tokens": 4})
    b2 = smol("b", sampling={"max_tokens": 4}, engine={"max_batch_size": 2})
    a_alias = {**A, "aliases": ["first"]}
    edits = [  # (models or raw text, what must become visible)
        ([A, b], lambda: "b" in models_ids(daemon) and daemon.model_status("b")["state"] == "ready"),
        ([A, b2], lambda: daemon.model_status("b")["worker"].get("pid") and
            daemon.status()["config"]["last_error"] is None and not daemon.status()["loading"]),
        ([a_alias, b2], lambda: "first" in models_ids(daemon)),
        ([a_alias], lambda: "b" not in models_ids(daemon)),
        ("models: [\n  {name: a, source: ", lambda: daemon.status()["config"]["last_error"]),
        ([A], lambda: "first" not in models_ids(daemon) and daemon.status()["config"]["last_error"] is None),
    ]
    with Load(daemon) as load:
        for i in range(20):
            content, visible = edits[i % len(edits)]
            gen = daemon.status()["config"]["generation"]
            text = content if isinstance(content, str) else yaml.safe_dump(
                {"server": {"port": daemon.port, "cache_dir": str(daemon.cache_dir), "drain_timeout": 20},
                 "models": content}, sort_keys=False)
            save_atomically(daemon.config_path, text)
            if isinstance(content, str):        # deadlines bound a hang only (a loaded machine is slow)
                wait_until(visible, 60.0, f"edit {i}: error visible")
                assert daemon.status()["config"]["generation"] == gen      # nothing applied
            else:
                wait_until(lambda: daemon.status()["config"]["generation"] > gen, 60.0, f"edit {i} applied")
                wait_until(visible, 300.0, f"edit {i} visible")            # a worker's load time
        time.sleep(0.5)
    assert load.failed == []
    assert load.ok > 20
    assert daemon.model_status("a")["pid"] == pid_a


@pytest.mark.parametrize("bad,expect", [
    ("models:\n  - name: a\n    source: [embedded\n", "YAML syntax error"),
    ("models:\n  - name: a\n    source: embedded:smollm2\n    turbo: true\n", "config.yaml:4: models[0].turbo"),
    ("models:\n  - {name: a, source: embedded:smollm2}\n  - {name: b, source: embedded:smollm2, aliases: [a]}\n",
     "config.yaml:3: models[1] (model 'b'): name or alias 'a' is already used"),
    ("models:\n  - name: a\n    sour", "config.yaml:"),
])
def test_bad_edits_are_harmless(daemon, bad, expect):
    pid = daemon.model_status("a")["pid"]
    good = daemon.config_path.read_text()
    gen = daemon.status()["config"]["generation"]
    daemon.config_path.write_text(bad)                       # written in place
    err = wait_until(lambda: daemon.status()["config"]["last_error"], 60.0, "error reported")
    assert expect in err
    assert daemon.status()["config"]["generation"] == gen
    metrics = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    assert 'mlxd_config_reloads_total{result="error"}' in metrics
    r = OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0).chat.completions.create(
        model="a", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content is not None
    daemon.config_path.write_text(good.replace("max_tokens: 4", "max_tokens: 5"))
    wait_until(lambda: daemon.status()["config"]["last_error"] is None, 60.0, "good save applied")
    assert daemon.model_status("a")["pid"] == pid   # a sampling default: applied live


def test_deleted_config_keeps_serving_and_reload_triggers(daemon):
    good = daemon.config_path.read_text()
    daemon.config_path.unlink()
    assert "cannot read config" in wait_until(lambda: daemon.status()["config"]["last_error"], 60.0, "error")
    assert daemon.model_status("a")["state"] == "ready"
    daemon.config_path.write_text(good.replace("max_tokens: 4", "max_tokens: 6"))
    wait_until(lambda: daemon.status()["config"]["last_error"] is None, 60.0, "recreated file applied")
    gen = daemon.status()["config"]["generation"]
    r = httpx.post(f"{daemon.url}/admin/reload", timeout=30)
    assert r.status_code == 200 and r.json()["generation"] == gen + 1
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["config"]["generation"] == gen + 2, 60.0, "SIGHUP reload")


def test_symlinked_config_is_followed(tmp_path):
    real = tmp_path / "dotfiles" / "mlxd.yaml"
    real.parent.mkdir()
    d = Daemon(tmp_path, [A])
    real.write_text(d.config_path.read_text())
    d.config_path.unlink()
    d.config_path.symlink_to(real)
    d.start()
    try:
        real.write_text(real.read_text().replace("name: a", "name: a\n  aliases: [linked]"))
        wait_until(lambda: "linked" in models_ids(d), 60.0, "edit through the symlink applied")
    finally:
        d.stop()


def test_removed_model_drains_in_flight_requests(daemon):
    b = smol("b", sampling={"max_tokens": 64, "temperature": 0.0})
    daemon.write_config([A, b], server={"drain_timeout": 300})
    wait_until(lambda: "b" in models_ids(daemon) and daemon.model_status("b")["state"] == "ready", 60, "b ready")
    client = OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="b", max_tokens=64, stream=True,
                                            messages=[{"role": "user", "content": "Tell me a story."}])
    first = next(iter(stream))
    daemon.write_config([A], server={"drain_timeout": 300})   # ample: the machine may be slow
    wait_until(lambda: "b" not in models_ids(daemon), 60.0, "b no longer routed")
    rest = list(stream)
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="b", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["code"] == "model_not_found"


# -- server settings apply live (host and port excepted) ----------------------------------
# One daemon for all of them; each test starts from BASE and puts it back. The shutdown test
# stops the daemon, so it comes last.

LIVE = smol("a", engine={"max_batch_size": 1}, sampling={"temperature": 0.0, "max_tokens": 4})
BASE = {"shutdown_timeout": 120}
HI = [{"role": "user", "content": "Hi"}]
STORY = [{"role": "user", "content": "Write a long story about the sea."}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("live"), [LIVE], server=BASE)
    d.start()
    yield d
    d.stop()


def reconfigure(d: Daemon, models=(LIVE,), **server) -> None:
    gen = d.status()["config"]["generation"]
    d.write_config(list(models), {**BASE, **server})
    wait_until(lambda: d.status()["config"]["generation"] > gen, 60, f"config with {server} applied")


def client_of(d: Daemon, key: str = "x") -> OpenAI:
    return OpenAI(base_url=f"{d.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_max_waiting_applies_without_a_new_worker(live):
    pid = live.model_status("a")["pid"]
    reconfigure(live, [{**LIVE, "engine": {"max_batch_size": 1, "max_waiting": 0}}])
    c = client_of(live)
    stream = c.chat.completions.create(model="a", max_tokens=200, stream=True, messages=STORY)
    next(iter(stream))                                  # running: the model's one slot
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="a", messages=HI)
    assert e.value.body["code"] == "model_at_capacity"
    stream.close()
    assert live.model_status("a")["pid"] == pid
    reconfigure(live)


def test_max_body_bytes_applies_live(live):
    body = {"model": "a", "messages": HI, "max_tokens": 1, "user": "u" * 5000}
    reconfigure(live, max_body_bytes=4096)
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert "server settings applied live: server.max_body_bytes" in live.tail(20000)
    reconfigure(live)
    assert httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_rate_limits_apply_live(live):
    c = client_of(live)
    reconfigure(live, rate_limit={"requests_per_minute": 2})
    for _ in range(2):                  # one token each, so the bucket (1 back per 30 s) cannot refill between them
        c.chat.completions.create(model="a", max_tokens=1, messages=HI)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="a", max_tokens=1, messages=HI)
    assert e.value.body["code"] == "rate_limit_exceeded"
    reconfigure(live)
    assert c.chat.completions.create(model="a", messages=HI).choices[0].message.content is not None


def test_api_keys_apply_live(live):
    live.headers = {"Authorization": "Bearer sk-live"}    # for the status polls, before and after
    try:
        reconfigure(live, auth={"api_keys": ["sk-live"]})
        with pytest.raises(openai.AuthenticationError):
            client_of(live, "wrong").chat.completions.create(model="a", messages=HI)
        assert client_of(live, "sk-live").chat.completions.create(model="a", messages=HI).choices
        reconfigure(live)
    finally:
        live.headers = {}
    assert client_of(live, "anything").chat.completions.create(model="a", messages=HI).choices


def test_request_timeout_applies_live(live):
    reconfigure(live, request_timeout=1)
    with pytest.raises(openai.APIStatusError) as e:
        client_of(live).chat.completions.create(model="a", max_tokens=400, messages=STORY)
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    reconfigure(live)


def test_memory_budget_applies_live(live):
    reconfigure(live, memory_budget="100MB")            # below what the idle model uses: it stops
    st = wait_until(lambda: (s := live.model_status("a"))["state"] == "stopped" and s, 30, "a stopped")
    assert st["pid"] is None
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200     # parked: loads on demand
    reconfigure(live)
    assert client_of(live).chat.completions.create(model="a", messages=HI).choices[0].message.content is not None


def test_worker_hang_timeout_applies_live(live):
    reconfigure(live, worker_hang_timeout=3)
    pid = live.model_status("a")["pid"]
    os.kill(pid, signal.SIGSTOP)
    st = live.wait_restarted("a", pid, timeout=60)
    assert "hung" in st["last_error"]
    reconfigure(live)


def test_drain_timeout_applies_live(live):
    b = smol("b", sampling={"temperature": 0.0})
    reconfigure(live, [LIVE, b], drain_timeout=60)
    wait_until(lambda: "b" in models_ids(live) and live.model_status("b")["state"] == "ready", 120, "b ready")
    stream = client_of(live).chat.completions.create(model="b", max_tokens=2000, stream=True, messages=STORY)
    next(iter(stream))
    before = len(live.log_path.read_text(errors="replace"))
    reconfigure(live, [LIVE], drain_timeout=1)            # the removal uses the new deadline
    with pytest.raises(openai.APIError, match="cancelled"):
        for _ in stream:
            pass
    log = live.log_path.read_text(errors="replace")[before:]
    assert in_order(log, "model b draining: waiting up to 1s for 1 in flight",
                    "model b: drain deadline reached; cancelling 1 request(s)")
    reconfigure(live)


def test_shutdown_timeout_applies_live(live):
    """Last: it stops the daemon."""
    reconfigure(live, shutdown_timeout=1)
    stream = client_of(live).chat.completions.create(model="a", max_tokens=2000, stream=True, messages=STORY)
    next(iter(stream))
    before = len(live.log_path.read_text(errors="replace"))
    live.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="cancelled"):
        for _ in stream:
            pass
    assert live.proc.wait(300) == 0
    log = live.log_path.read_text(errors="replace")[before:]
    assert in_order(log, "waiting up to 1s for 1 in flight", "deadline reached; cancelling 1 request(s)")


def test_chat_template_file_edited_in_place_restarts_the_model(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    d = Daemon(tmp_path, [smol("t", chat_template=str(template), sampling={"max_tokens": 2})])
    d.start()
    try:
        c = OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def prompt_tokens() -> int:
            r = c.chat.completions.create(model="t", messages=[{"role": "user", "content": "Hi"}])
            return r.usage.prompt_tokens

        before, pid = prompt_tokens(), d.model_status("t")["pid"]
        template.write_text("Answer briefly and kindly. {% for m in messages %}{{ m.content }}{% endfor %}")
        wait_until(lambda: d.model_status("t")["pid"] not in (None, pid) and d.model_status("t")["state"] == "ready",
                   60.0, "a new worker with the edited template")
        assert prompt_tokens() > before
    finally:
        d.stop()
