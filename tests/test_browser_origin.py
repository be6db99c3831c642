"""No web page can drive or read mlxd: tested as an attacker would, with a real browser.

A page served from another local port (headless Chromium, as in test_console.py) sends every
request a page can send to localhost without a preflight, plus a preflighted DELETE and a
read; the daemon's counters, model states, cache and config generation show that none took
effect, its refusal counter shows they arrived, and the page read nothing. DNS rebinding (a
foreign Host) is refused over plain HTTP; the official SDKs, a trusted origin (CORS) and the
console keep working.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import threading
import time

import anthropic
import httpx
import pytest

from conftest import Daemon, free_port, smol, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY_PROMPT = [{"role": "user", "content": "Say hello."}]

ATTACK = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="f" method="POST" enctype="text/plain" target="sink" action="{D}/v1/chat/completions">
  <input name='{{"model":"smol","max_tokens":8,"messages":[{{"role":"user","content":"pwned"}}],"x":"' value='"}}'>
</form>
<script>
const D = "{D}";
const chat = JSON.stringify({{model: "smol", max_tokens: 8, messages: [{{role: "user", content: "pwned"}}]}});
const results = {{}};
async function attempt(name, f) {{
  try {{ results[name] = await f(); }} catch (e) {{ results[name] = "error: " + e; }}
}}
async function readBody(r) {{ return {{type: r.type, status: r.status, body: await r.text()}}; }}
(async () => {{
  const nc = (path, body, extra) => fetch(D + path, Object.assign(
      {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}}, extra || {{}})).then(readBody);
  await attempt("nocors_chat", () => nc("/v1/chat/completions", chat));
  await attempt("nocors_completions", () => nc("/v1/completions", JSON.stringify({{model: "smol", prompt: "pwned", max_tokens: 8}})));
  await attempt("nocors_messages", () => nc("/v1/messages", JSON.stringify({{model: "smol", max_tokens: 8, messages: [{{role: "user", content: "pwned"}}]}})));
  await attempt("nocors_responses", () => nc("/v1/responses", JSON.stringify({{model: "smol", input: "pwned", max_output_tokens: 8}})));
  results.beacon_chat = navigator.sendBeacon(D + "/v1/chat/completions", chat);
  results.beacon_unload = navigator.sendBeacon(D + "/v1/models/smol/unload");
  for (const action of ["unload", "pin", "load", "unpin"]) {{
    await attempt("empty_" + action, () => fetch(D + "/v1/models/smol/" + action, {{method: "POST", mode: "no-cors"}}).then(readBody));
  }}
  await attempt("empty_reload", () => fetch(D + "/admin/reload", {{method: "POST", mode: "no-cors"}}).then(readBody));
  await attempt("delete_cache", () => fetch(D + "/v1/cache?model=smol", {{method: "DELETE"}}).then(readBody));
  await attempt("json_chat", () => fetch(D + "/v1/chat/completions", {{method: "POST",
      headers: {{"Content-Type": "application/json"}}, body: chat}}).then(readBody));
  await attempt("read_status", () => fetch(D + "/v1/status").then(readBody));
  await attempt("read_status_nocors", () => fetch(D + "/v1/status", {{mode: "no-cors"}}).then(readBody));
  document.getElementById("f").submit();
  window.__results = results;
}})();
</script></body></html>"""

TRUSTED = """<!doctype html><html><body><script>
(async () => {{
  try {{
    const r = await fetch("{D}/v1/chat/completions", {{method: "POST", headers: {{"Content-Type": "application/json"}},
      body: JSON.stringify({{model: "smol", max_tokens: 4, messages: [{{role: "user", content: "Hi"}}]}})}});
    window.__results = {{status: r.status, body: await r.json()}};
  }} catch (e) {{ window.__results = {{error: String(e)}}; }}
}})();
</script></body></html>"""


class _Pages(http.server.BaseHTTPRequestHandler):
    """The attacker's and the trusted app's pages, on a port of their own."""
    pages: dict = {}

    def do_GET(self):
        body = self.pages.get(self.path.split("?")[0])
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Pages)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield port
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, site):
    # The trusted app is the same server reached as "localhost": another origin.
    server = {"allowed_origins": [f"http://localhost:{site}"]}
    with Daemon(tmp_path_factory.mktemp("origin"), [smol("smol", sampling={"temperature": 0.0, "max_tokens": 8})],
                server=server) as d:
        _Pages.pages.update({"/attack": ATTACK.format(D=d.url), "/trusted": TRUSTED.format(D=d.url)})
        yield d


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (ops/setup.sh --test installs it)")
    with playwright_api.sync_playwright() as p:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}   # as in test_console.py
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], env=env)
        yield b
        b.close()


def refused(d: Daemon) -> float:
    text = httpx.get(d.url + "/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r'^mlxd_http_refused_total\{[^}]*\} (\S+)$', text, re.M))


def footprint(d: Daemon) -> dict:
    """What any of the attacks would change: model state, worker, pin, tokens, cache, config generation."""
    st = d.status()
    m = next(x for x in st["models"] if x["name"] == "smol")
    return {"state": m["state"], "pid": m["pid"], "pinned": m["pinned"], "tokens": m["tokens"],
            "cache_entries": (m["cache"] or {}).get("entries"), "generation": st["config"]["generation"]}


def test_a_foreign_page_cannot_drive_or_read_mlxd(daemon, site, browser):
    client = daemon.openai()
    client.chat.completions.create(model="smol", messages=KEY_PROMPT)     # a cache entry for DELETE to clear
    before = wait_until(lambda: (f := footprint(daemon))["cache_entries"] and f, 60, "a cache entry")
    refused_before = refused(daemon)

    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(f"http://127.0.0.1:{site}/attack")
    page.wait_for_function("() => window.__results !== undefined", timeout=60_000)
    results = page.evaluate("() => window.__results")
    page.wait_for_timeout(1000)     # the form's navigation and the beacons are sent by now
    ctx.close()

    # None took effect (a look after a pause, for anything that would take time: an unload, a reload) ...
    time.sleep(3)
    assert footprint(daemon) == before, daemon.tail()
    # ... though every request arrived and was refused (the no-cors fetches, beacons, form,
    # action POSTs, the DELETE's preflight, the CORS POST and read: 14 at least).
    wait_until(lambda: refused(daemon) - refused_before >= 14, 30,
               lambda: f"refusals: {refused(daemon) - refused_before}, results: {results}")
    # The page read nothing: opaque answers (no-cors) or network errors (CORS refused).
    for name, r in results.items():
        if isinstance(r, dict):
            assert r["type"] == "opaque" and r["body"] == "" and r["status"] == 0, (name, r)
        else:
            assert r is True or (isinstance(r, str) and r.startswith("error: TypeError")), (name, r)
    assert results["beacon_chat"] is True      # the browser queued it: the daemon is what refused it


def test_a_trusted_origin_calls_and_reads(daemon, site, browser):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(f"http://localhost:{site}/trusted")
    page.wait_for_function("() => window.__results !== undefined", timeout=300_000)
    r = page.evaluate("() => window.__results")
    ctx.close()
    assert r.get("status") == 200, r
    assert r["body"]["choices"][0]["message"]["content"]


def test_dns_rebinding_host_is_refused_in_each_shape(daemon):
    for path in ("/v1/status", "/ui/events", "/v1/models"):
        r = httpx.get(daemon.url + path, headers={"Host": f"evil.example:{daemon.port}"}, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (path, r.text)
    r = httpx.delete(daemon.url + "/v1/cache?model=smol", headers={"Host": "evil.example"}, timeout=10)
    assert r.status_code == 403
    body = {"model": "smol", "max_tokens": 8, "messages": KEY_PROMPT}
    r = httpx.post(daemon.url + "/v1/messages", json=body, headers={"Host": f"evil.example:{daemon.port}"}, timeout=10)
    assert r.status_code == 403 and r.json() == {"type": "error", "error": {"type": "permission_error",
                                                                            "message": r.json()["error"]["message"]}}
    # The names of this daemon, with its port, are answered.
    for host in (f"localhost:{daemon.port}", f"127.0.0.1:{daemon.port}", f"[::1]:{daemon.port}"):
        assert httpx.get(daemon.url + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200, host
    assert httpx.get(daemon.url + "/v1/models", headers={"Host": "localhost:1"}, timeout=10).status_code == 403


def test_a_refusal_closes_its_connection_so_the_next_request_opens_a_fresh_one(daemon):
    """A refused request's body is never read, so the server closes the connection after the
    403; it says `Connection: close`, and one client sending refused and accepted requests in a
    row over keep-alive gets every answer (the soak once saw "Server disconnected without sending
    a response" on the request after a refused one)."""
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    body = json.dumps({"model": "smol", "max_tokens": 8, "messages": KEY_PROMPT})
    with httpx.Client(base_url=daemon.url, timeout=10) as c:
        for _ in range(20):
            r = c.post("/v1/messages", content=body, headers=page)
            assert r.status_code == 403 and r.headers["connection"] == "close", r.headers
            r = c.post("/v1/models/smol/unload", headers={"Origin": "http://evil.example"})
            assert r.status_code == 403 and r.headers["connection"] == "close", r.headers
            assert c.get("/v1/models").status_code == 200


def test_origins_and_preflights(daemon, site):
    evil, good = f"http://127.0.0.1:{site}", f"http://localhost:{site}"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
    r = httpx.options(daemon.url + "/v1/chat/completions", headers={"Origin": evil, **pre}, timeout=10)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.options(daemon.url + "/v1/chat/completions", headers={"Origin": good, **pre}, timeout=10)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == good
    assert "content-type" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(daemon.url + "/v1/models", headers={"Origin": good}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == good
    r = httpx.get(daemon.url + "/v1/models", headers={"Origin": evil}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.get(daemon.url + "/v1/models", headers={"Origin": "null"}, timeout=10)
    assert r.status_code == 403
    # The console's own origin (the address the browser used) is not cross-origin.
    r = httpx.post(daemon.url + "/v1/models/smol/pin", headers={"Origin": daemon.url}, timeout=10)
    assert r.status_code == 200 and r.json()["pinned"] is True and "access-control-allow-origin" not in r.headers
    httpx.post(daemon.url + "/v1/models/smol/unpin", timeout=10).raise_for_status()
    # An action a browser marks cross-site is refused even without an Origin header.
    r = httpx.post(daemon.url + "/v1/models/smol/pin", headers={"Sec-Fetch-Site": "cross-site"}, timeout=10)
    assert r.status_code == 403 and daemon.model_status("smol")["pinned"] is False


def test_json_routes_require_json_in_their_shape(daemon):
    body = json.dumps({"model": "smol", "max_tokens": 8, "messages": KEY_PROMPT})
    own = {"Origin": daemon.url}          # the console's own page: a browser, so the type must be JSON
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "multipart/form-data; boundary=x"},
                    {"Content-Type": "text/plain", **own}, {"Content-Type": "application/x-www-form-urlencoded", **own},
                    own, {"Sec-Fetch-Site": "same-origin"}):
        r = httpx.post(daemon.url + "/v1/chat/completions", content=body, headers=headers, timeout=10)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (headers, r.text)
        r = httpx.post(daemon.url + "/v1/messages", content=body, headers=headers, timeout=10)
        assert r.status_code == 415 and r.json()["type"] == "error", (headers, r.text)
    r = httpx.post(daemon.url + "/v1/models/smol/pin", content="{}", headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and daemon.model_status("smol")["pinned"] is False
    # curl -d '{...}' (form-urlencoded, no Origin) is a script, not a page: read as JSON.
    r = httpx.post(daemon.url + "/v1/messages", content=body,
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=300)
    assert r.status_code == 200, r.text


def test_official_sdks_still_work(daemon):
    out = daemon.openai().chat.completions.create(model="smol", messages=KEY_PROMPT)
    assert out.choices[0].message.content
    msg = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=300).messages.create(
        model="smol", max_tokens=8, messages=KEY_PROMPT)
    assert msg.content[0].text
    # Empty-bodied actions from scripts (curl -X POST) still work.
    r = httpx.post(daemon.url + "/v1/models/smol/unpin", timeout=10)
    assert r.status_code == 200
