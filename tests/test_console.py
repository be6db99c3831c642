"""The web console in a real headless browser (Debian's chromium driven by Playwright),
on the real daemon and model; the model actions API over HTTP.

Screenshots land in .cache/test/screenshots (git-ignored); docs/ holds a copy of each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import httpx
import pytest

from conftest import ROOT, Daemon, OnDemandDaemon, smol
from test_agents import THINK_TEMPLATE


def expect(*args, **kw):
    """Playwright's expect, imported only by the browser tests (the API tests here need none)."""
    from playwright.sync_api import expect as pw_expect

    return pw_expect(*args, **kw)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / ".cache" / "test" / "screenshots"
STATIC = ROOT / "daemon" / "api" / "console" / "static"
XSS_ALIAS = "<script>window.__pwned = 1</script>"
LOAD = 300_000     # ms: a worker load on a busy 2-core machine


def models(d: Daemon) -> list[dict]:
    """smol-b is a reasoning model: a think template (test_agents.py's) and reasoning_parser think."""
    return [smol("smol-a", aliases=["default"], sampling={"temperature": 0.0, "max_tokens": 24}),
            smol("smol-b", aliases=[XSS_ALIAS, "<img src=x onerror=window.__pwned=2>"], idle_ttl=3600,
                 chat_template=str(d.tmp / "think.jinja"), reasoning_parser="think",
                 sampling={"temperature": 0.0, "max_tokens": 200})]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    (tmp / "think.jinja").write_text(THINK_TEMPLATE)
    d = Daemon(tmp, [])
    d.write_config(models(d))
    with d:
        yield d


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (ops/setup.sh --test installs it)")
    with playwright_api.sync_playwright() as p:
        # Not with the tests' LD_PRELOAD of OpenBLAS: chromium never opens a page with it.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], env=env)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh tab that records console errors and uncaught exceptions."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()


def card(pg, name: str):
    return pg.locator(f'article.model[data-model="{name}"]')


def open_console(pg, d: Daemon):
    pg.goto(d.url + "/")
    expect(card(pg, "smol-a").locator(".state")).to_have_text("ready", timeout=30_000)


def shot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / name), full_page=True)


def test_page_loads_clean_and_shows_both_models_ready(daemon, page):
    resp = page.goto(daemon.url + "/")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    for name in ("smol-a", "smol-b"):
        expect(card(page, name).locator(".state")).to_have_text("ready", timeout=30_000)
    expect(page.locator("#conn")).to_have_text("live")
    assert page.locator("#config-error").is_hidden()
    assert page.errors == []


def test_model_name_with_script_renders_as_text(daemon, page):
    open_console(page, daemon)
    expect(card(page, "smol-b").locator(".aliases")).to_contain_text(XSS_ALIAS)
    options = page.locator("#pg-model option").all_text_contents()
    assert any(o.startswith(XSS_ALIAS) for o in options), options
    assert page.locator("script").count() == 1 and page.locator("img").count() == 0
    assert page.evaluate("() => window.__pwned") is None
    assert page.errors == []


def test_running_count_follows_a_streaming_request(daemon, page):
    open_console(page, daemon)
    running = card(page, "smol-b").locator('[data-field="in_flight"]')
    expect(running).to_have_text("0")
    body = {"model": "smol-b", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]}
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()      # kept: a dropped iterator closes the response
        next(lines)
        expect(running).to_have_text("1", timeout=30_000)
        row = page.locator("#requests tbody tr").first
        expect(row).to_contain_text("smol-b")
        expect(row.locator("td").last).to_have_text(re.compile("started|prefill|decoding"), timeout=30_000)
    expect(running).to_have_text("0", timeout=60_000)
    expect(page.locator("#requests tbody tr").first.locator("td").last).to_have_text(re.compile("cancelled|ok"), timeout=30_000)
    assert page.errors == []


def test_broken_config_error_shows_its_line_and_clears_once_fixed(daemon, page):
    open_console(page, daemon)
    bad = "<script>window.__pwned = 3</script>"
    daemon.write_config(models(daemon) + [smol(bad)])
    text = daemon.config_path.read_text()
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "__pwned = 3" in ln)
    try:
        banner = page.locator("#config-error")
        expect(banner).to_be_visible(timeout=30_000)
        expect(banner).to_contain_text(f"config.yaml:{line}")
        expect(banner).to_contain_text(bad)
        assert page.evaluate("() => window.__pwned") is None
    finally:
        daemon.write_config(models(daemon))
    expect(banner).to_be_hidden(timeout=30_000)
    assert page.errors == []


def test_playground_streams_an_answer_with_cached_tokens_on_the_second_turn(daemon, page):
    open_console(page, daemon)
    page.click("button.tab[data-tab=playground]")
    page.select_option("#pg-model", "smol-a")
    page.fill("#pg-system", "You are a concise assistant.")
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "24")
    stats = page.locator(".turn.assistant .turn-stats")
    for i, msg in enumerate(("What is the capital of France?", "And of Italy?")):
        page.fill("#pg-input", msg)
        page.press("#pg-input", "Enter")
        expect(stats.nth(i)).to_have_attribute("data-cached", re.compile(r"\d+"), timeout=120_000)
    answers = page.locator(".turn.assistant .content").all_text_contents()
    assert len(answers) == 2 and all(a.strip() for a in answers), answers
    assert int(stats.nth(1).get_attribute("data-cached")) > 0
    assert int(stats.nth(0).get_attribute("data-cached")) < int(stats.nth(1).get_attribute("data-cached"))
    expect(stats.nth(1)).to_contain_text("TTFT")
    expect(stats.nth(1)).to_contain_text("tok/s")
    shot(page, "playground.png")
    assert page.errors == []


def test_playground_shows_a_reasoning_models_thinking_collapsed(daemon, page):
    """smol-b's real stream: its reasoning in the collapsed view and its answer after it, as the
    API returns them to a client asking the same (greedy)."""
    question = "What is the capital of France?"
    ref = daemon.openai().chat.completions.create(model="smol-b", temperature=0, max_tokens=40, messages=[
        {"role": "user", "content": question}]).choices[0].message
    assert ref.model_extra["reasoning_content"], ref        # the template opened <think>: the model reasons
    open_console(page, daemon)
    page.click("button.tab[data-tab=playground]")
    page.select_option("#pg-model", "smol-b")
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "40")
    page.fill("#pg-input", question)
    page.press("#pg-input", "Enter")
    turn = page.locator(".turn.assistant")
    expect(turn.locator(".turn-stats")).to_have_attribute("data-cached", re.compile(r"\d+"), timeout=120_000)
    reasoning = turn.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None                 # collapsed
    expect(reasoning.locator(".content")).to_have_text(ref.model_extra["reasoning_content"], use_inner_text=False)
    expect(turn.locator(":scope > .content")).to_have_text(ref.content or "", use_inner_text=False)
    assert page.errors == []


def test_playground_renders_tool_calls_and_markup_as_text(daemon, page):
    """Rendering only: the playground sends no tools, so the browser gets a canned stream with a
    call, and markup in reasoning and arguments that must stay text."""
    def chunk(delta=None, usage=None):
        body = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} if delta else {"choices": []}
        return "data: " + json.dumps({**body, **({"usage": usage} if usage else {})}) + "\n\n"
    sse = "".join([
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "The user wants <b>weather</b>; "}),
        chunk({"reasoning_content": "call the tool."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"<Paris>"}'}}]}),
        chunk({"content": "Checking."}),
        chunk(usage={"prompt_tokens": 20, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 12}}),
        "data: [DONE]\n\n"])
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse))
    open_console(page, daemon)
    page.click("button.tab[data-tab=playground]")
    page.fill("#pg-input", "Weather in Paris?")
    page.press("#pg-input", "Enter")
    turn = page.locator(".turn.assistant")
    expect(turn.locator(".turn-stats")).to_have_attribute("data-cached", "12")
    reasoning = turn.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None                 # collapsed
    expect(reasoning.locator(".content")).to_have_text("The user wants <b>weather</b>; call the tool.",
                                                       use_inner_text=False)
    expect(turn.locator(".tool-name")).to_have_text("tool call: get_weather")
    expect(turn.locator(".tool-call pre")).to_have_text('{"city": "<Paris>"}')
    expect(turn.locator(":scope > .content")).to_have_text("Checking.")
    assert page.locator("b").count() == 0
    assert page.errors == []


def test_unload_and_load_buttons_change_the_model_state(daemon, page):
    open_console(page, daemon)
    c = card(page, "smol-b")
    c.get_by_role("button", name="Unload").click()
    expect(c.locator(".state")).to_have_text("stopped", timeout=60_000)
    assert daemon.model_status("smol-b")["pid"] is None
    c.get_by_role("button", name="Load").click()
    expect(c.locator(".state")).to_have_text("ready", timeout=LOAD)
    c.get_by_role("button", name="Pin").click()
    expect(c.locator('[data-field="pinned"]')).to_have_text("yes")
    c.get_by_role("button", name="Unpin").click()
    expect(c.locator('[data-field="pinned"]')).to_have_text("no")
    page.wait_for_timeout(1500)     # a chart point or two from the earlier tests, for the picture
    shot(page, "console.png")
    assert page.errors == []


def test_actions_api(daemon):
    post = lambda path, **kw: httpx.post(daemon.url + path, timeout=120, **kw)
    r = post("/v1/models/default/pin")     # an alias names its model
    assert r.status_code == 200 and r.json() == {"model": "smol-a", "state": "ready", "pinned": True}
    assert daemon.model_status("smol-a")["pinned"] is True
    r = post("/v1/models/smol-a/load")
    assert r.status_code == 200 and r.json()["state"] == "ready"
    r = post("/v1/models/nope/unload")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post("/v1/models/smol-a/unload", json={"force": True})
    assert r.status_code == 400 and "force" in r.json()["error"]["message"]
    # A runtime pin lasts until the model's entry changes.
    changed = models(daemon)
    changed[0]["sampling"]["max_tokens"] = 25
    generation = daemon.status()["config"]["generation"]
    daemon.write_config(changed)
    deadline = time.monotonic() + 30
    while daemon.status()["config"]["generation"] == generation and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.model_status("smol-a")["pinned"] is False
    daemon.write_config(models(daemon))


def test_console_can_be_turned_off(daemon):
    daemon.write_config(models(daemon), {"console": False})
    try:
        deadline = time.monotonic() + 30
        while httpx.get(daemon.url + "/").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        r = httpx.get(daemon.url + "/")
        assert r.status_code == 404 and "server.console" in r.json()["error"]["message"]
        assert httpx.get(daemon.url + "/ui/events").status_code == 404
    finally:
        daemon.write_config(models(daemon))
    deadline = time.monotonic() + 30
    while httpx.get(daemon.url + "/").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(daemon.url + "/").status_code == 200




def test_a_key_is_required_when_configured(tmp_path, page):
    key = "sk-console-test-7f3a"
    d = OnDemandDaemon(tmp_path, [smol("lazy", preload=False)], {"auth": {"api_keys": [key]}}, api_key=key)
    d.start()
    try:
        assert httpx.get(d.url + "/").status_code == 200           # the page itself holds no data
        assert httpx.get(d.url + "/ui/events").status_code == 401
        assert httpx.post(d.url + "/v1/models/lazy/pin").status_code == 401
        r = httpx.post(d.url + "/v1/models/lazy/pin", headers=d.headers)
        assert r.status_code == 200 and r.json()["pinned"] is True
        page.goto(d.url + "/")
        expect(page.locator("#keygate")).to_be_visible(timeout=30_000)
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        expect(page.locator("#key-error")).to_contain_text("not accepted")
        page.fill("#key-input", key)
        page.press("#key-input", "Enter")
        expect(card(page, "lazy").locator(".state")).to_have_text("stopped", timeout=30_000)
        expect(page.locator("#keygate")).to_be_hidden()
        assert page.evaluate("() => sessionStorage.getItem('mlxd.key')") == key
        assert key not in page.content()
    finally:
        d.stop()


def test_page_weight_is_under_150_kb():
    total = sum(p.stat().st_size for p in STATIC.iterdir() if p.suffix in (".html", ".js", ".css"))
    assert 0 < total < 150 * 1024, total
