// mlxd console: one SSE stream of the daemon's state, model actions, a chat playground.
// Every value from the daemon goes into the page as text (textContent), never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY = "mlxd.key";
let state = null, stateKey = "", skew = 0, stream = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function headers(extra = {}) {
  const k = sessionStorage.getItem(KEY);
  return k ? { ...extra, Authorization: "Bearer " + k } : extra;
}

// ---- formatting ----------------------------------------------------------------------

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return (n / 1024 ** i).toFixed(i ? 1 : 0) + " " + u[i];
}
function dur(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}
const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "–");
const num = (v, d = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const pct = (a, b) => (b ? ((100 * a) / b).toFixed(1) + "%" : "–");
const now = () => Date.now() / 1000 + skew;

// ---- connection ----------------------------------------------------------------------

function setConn(text, cls) {
  const c = $("#conn");
  c.textContent = text;
  c.className = "conn " + (cls || "");
}

function askKey(message) {
  $("#keygate").hidden = false;
  $("#key-error").textContent = message || "";
  $("#key-input").focus();
  setConn("key needed", "bad");
}

async function connect() {
  if (stream) stream.abort();
  const ctl = new AbortController();
  stream = ctl;
  let resp;
  try {
    resp = await fetch("/ui/events", { headers: headers(), signal: ctl.signal, cache: "no-store" });
  } catch (e) {
    if (ctl.signal.aborted) return;
    setConn("offline", "bad");
    setTimeout(connect, 2000);
    return;
  }
  if (resp.status === 401) {
    askKey(sessionStorage.getItem(KEY) ? "That key was not accepted." : "");
    return;
  }
  if (!resp.ok) {
    setConn(`error ${resp.status}`, "bad");
    setTimeout(connect, 5000);
    return;
  }
  $("#keygate").hidden = true;
  $("#forget-key").hidden = !sessionStorage.getItem(KEY);
  setConn("live", "ok");
  try {
    await readSSE(resp, (data) => onSnapshot(JSON.parse(data)));
  } catch (e) {
    if (ctl.signal.aborted) return;
  }
  if (stream === ctl) {
    setConn("reconnecting", "bad");
    setTimeout(connect, 2000);
  }
}

// Calls `onData` with each event's data; SSE comments (": ...") are skipped.
async function readSSE(resp, onData) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length && onData(data.join("\n")) === false) return;
    }
  }
}

function onSnapshot(msg) {
  skew = msg.now - Date.now() / 1000;
  const key = JSON.stringify(msg.state);
  if (key === stateKey) return;
  stateKey = key;
  state = msg.state;
  render();
}

// ---- dashboard -----------------------------------------------------------------------

function render() {
  const s = state;
  const ready = s.models.filter((m) => m.state === "ready").length;
  $("#summary").textContent = `${ready}/${s.models.length} models ready · config generation ${s.config.generation}`;
  const err = s.config.last_error;
  $("#config-error").hidden = !err;
  $("#config-error-text").textContent = err || "";
  const dl = $("#config");
  dl.replaceChildren();
  kv(dl, "Config", s.config.path || "(none)");
  kv(dl, "Generation", s.config.generation);
  kv(dl, "Loaded at", s.config.loaded_at ? new Date(s.config.loaded_at * 1000).toLocaleString() : "–");
  kv(dl, "Daemon up", dur(now() - s.started), { since: s.started });
  kv(dl, "API keys", s.auth ? "required" : "off");
  if (s.draining) kv(dl, "State", "shutting down");
  renderModels(s.models, s.requests);
  renderRequests(s.requests);
  renderModelPicker(s.models);
}

function kv(dl, k, v, opts = {}) {
  const wrap = el("div", "kv" + (opts.cls ? " " + opts.cls : ""));
  wrap.append(el("dt", null, k));
  const dd = el("dd", null, v);
  if (opts.field) dd.dataset.field = opts.field;
  if (opts.since !== undefined) dd.dataset.since = opts.since ?? "";
  if (opts.until !== undefined) dd.dataset.until = opts.until ?? "";
  if (opts.title) dd.title = opts.title;
  wrap.append(dd);
  dl.append(wrap);
  return dd;
}

function ttlDeadline(m) {
  if (!m.idle_ttl || m.pinned || m.state !== "ready" || m.in_flight) return null;
  return (m.last_used || m.started) + m.idle_ttl;
}

function renderModels(models, requests) {
  const box = $("#models");
  box.replaceChildren();
  for (const m of models) {
    const card = el("article", "card model");
    card.dataset.model = m.name;
    const head = el("div", "model-head");
    head.append(el("h3", "name", m.name), el("span", `state state-${m.state}`, m.state));
    if (m.pending) head.append(el("span", "tag", "replacement"));
    if (m.pinned) head.append(el("span", "tag", "pinned"));
    card.append(head);
    if (m.aliases.length) card.append(el("div", "aliases muted", "aliases: " + m.aliases.join(", ")));
    if (m.error && m.state !== "ready") card.append(el("div", "error-text model-error", m.error));
    const dl = el("dl", "grid");
    kv(dl, "Source", m.source, { cls: "wide" });
    kv(dl, "Device", [m.device, m.dtype, m.blas && "BLAS " + m.blas].filter(Boolean).join(" · ") || "–", { cls: "wide" });
    kv(dl, "PID", m.pid ?? "–");
    kv(dl, "Memory", m.memory_bytes ? bytes(m.memory_bytes) : "–");
    kv(dl, "Uptime", m.started ? dur(now() - m.started) : "–", { since: m.started });
    kv(dl, "Restarts", m.restarts);
    kv(dl, "In flight", m.in_flight, { field: "in_flight" });
    kv(dl, "Run / wait", `${m.running} / ${m.waiting}`, { field: "running" });
    kv(dl, "Tokens/s now", num(m.tokens_per_s, 1), { field: "tps" });
    kv(dl, "Last used", m.last_used ? dur(now() - m.last_used) + " ago" : "never", { since: m.last_used, cls: "ago" });
    const ttl = ttlDeadline(m);
    kv(dl, "Idle TTL left", m.idle_ttl ? (ttl ? dur(ttl - now()) : m.pinned ? "pinned" : "–") : "none", { until: ttl });
    kv(dl, "Pinned", m.pinned ? "yes" : "no", { field: "pinned" });
    card.append(dl);
    card.append(actions(m));
    if (m.cache) card.append(cacheBlock(m, requests));
    box.append(card);
  }
}

function actions(m) {
  const row = el("div", "actions");
  const running = !["stopped", "failed"].includes(m.state);
  const name = encodeURIComponent(m.name);
  const btn = (label, method, path, confirmText) => {
    const b = el("button", "small", label);
    b.type = "button";
    b.addEventListener("click", async () => {
      if (confirmText && !confirm(confirmText)) return;
      b.disabled = true;
      await act(method, path);
      b.disabled = false;
    });
    row.append(b);
  };
  if (m.pending) return row;
  if (running) btn("Unload", "POST", `/v1/models/${name}/unload`);
  else btn("Load", "POST", `/v1/models/${name}/load`);
  btn(m.pinned ? "Unpin" : "Pin", "POST", `/v1/models/${name}/${m.pinned ? "unpin" : "pin"}`);
  if (m.cache && m.state === "ready")
    btn("Clear cache", "DELETE", `/v1/cache?model=${name}`, `Clear the prefix cache of ${m.name} (memory and disk)?`);
  return row;
}

async function act(method, path) {
  const box = $("#action-error");
  try {
    const r = await fetch(path, { method, headers: headers() });
    if (r.status === 401) return askKey("That key was not accepted.");
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      box.textContent = `${method} ${path}: ${(body.error && body.error.message) || r.status}`;
      box.hidden = false;
      return;
    }
    box.hidden = true;
  } catch (e) {
    box.textContent = `${method} ${path}: ${e}`;
    box.hidden = false;
  }
}

function bar(label, used, budget, entries) {
  const wrap = el("div", "bar-row");
  wrap.append(el("span", "bar-label", label));
  const b = el("div", "bar");
  const fill = el("div", "fill");
  const frac = budget ? Math.min(1, used / budget) : 0;
  fill.style.width = (100 * frac).toFixed(1) + "%"; // CSSOM, allowed under a strict style-src
  if (frac > 0.9) fill.classList.add("hot");
  b.append(fill);
  wrap.append(b, el("span", "bar-text", `${entries} ${entries === 1 ? "entry" : "entries"} · ${bytes(used)} / ${bytes(budget)}`));
  return wrap;
}

function cacheBlock(m, requests) {
  const c = m.cache;
  const box = el("div", "cache");
  box.append(el("h4", null, "Prefix cache" + (c.kv_bits ? ` (KV ${c.kv_bits}-bit)` : "")));
  box.append(bar("memory", c.memory.bytes, c.memory.budget, c.memory.entries));
  box.append(bar("disk", c.disk.bytes, c.disk.budget, c.disk.entries));
  const dl = el("dl", "grid tight");
  kv(dl, "Hit rate (tokens)", pct(c.hit_tokens, c.query_tokens), { field: "hit_rate" });
  kv(dl, "Tokens saved", c.hit_tokens);
  kv(dl, "Evictions", c.evictions);
  kv(dl, "Corrupt discarded", c.corrupt);
  if (c.disk_errors) kv(dl, "Disk write errors", c.disk_errors, { cls: "bad" });
  box.append(dl);
  const legend = el("div", "legend muted small");
  legend.append(el("span", "key ttft", "TTFT"), el("span", "key hits", "cached tokens"), el("span", null, "last 10 min"));
  const canvas = el("canvas", "chart");
  box.append(legend, canvas);
  requestAnimationFrame(() => chart(canvas, requests.filter((r) => r.model === m.name && r.ttft !== null)));
  return box;
}

function chart(canvas, points) {
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 70, dpr = window.devicePixelRatio || 1;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  const css = getComputedStyle(document.body);
  const t1 = now(), t0 = t1 - 600, pad = 14;
  const pts = points.filter((p) => p.time >= t0).sort((a, b) => a.time - b.time);
  g.strokeStyle = css.getPropertyValue("--line");
  g.beginPath();
  g.moveTo(0, h - pad + 0.5);
  g.lineTo(w, h - pad + 0.5);
  g.stroke();
  g.fillStyle = css.getPropertyValue("--muted");
  g.font = "10px system-ui, sans-serif";
  if (!pts.length) {
    g.fillText("no requests yet", 4, h / 2);
    return;
  }
  const maxT = Math.max(...pts.map((p) => p.ttft), 0.001);
  const maxC = Math.max(...pts.map((p) => p.cached_tokens || 0), 1);
  const x = (t) => ((t - t0) / 600) * (w - 4) + 2;
  g.fillStyle = css.getPropertyValue("--hits");
  for (const p of pts) {
    const bh = ((p.cached_tokens || 0) / maxC) * (h - 2 * pad);
    g.fillRect(x(p.time) - 2, h - pad - bh, 4, bh);
  }
  g.strokeStyle = g.fillStyle = css.getPropertyValue("--ttft");
  g.beginPath();
  pts.forEach((p, i) => {
    const y = h - pad - (p.ttft / maxT) * (h - 2 * pad);
    i ? g.lineTo(x(p.time), y) : g.moveTo(x(p.time), y);
  });
  g.stroke();
  for (const p of pts) g.fillRect(x(p.time) - 1.5, h - pad - (p.ttft / maxT) * (h - 2 * pad) - 1.5, 3, 3);
  g.fillStyle = css.getPropertyValue("--muted");
  g.fillText(`TTFT max ${maxT.toFixed(2)} s`, 2, 10);
  const right = `cached max ${maxC}`;
  g.fillText(right, w - g.measureText(right).width - 2, 10);
  g.fillText("−10 min", 2, h - 2);
  g.fillText("now", w - 20, h - 2);
}

function renderRequests(reqs) {
  const body = $("#requests tbody");
  body.replaceChildren();
  if (!reqs.length) {
    const tr = el("tr");
    const td = el("td", "muted", "No requests yet.");
    td.colSpan = 10;
    tr.append(td);
    body.append(tr);
  }
  for (const r of reqs) {
    const tr = el("tr", "status-" + r.status);
    const status = r.status === "running"
      ? (r.progress ? `prefill ${r.progress[0]}/${r.progress[1]}` : r.generated ? "decoding" : "started")
      : r.status;
    // The prefix cache's outcome: why this request got less than the cache shares with it.
    const miss = r.cache && r.cache.reason ? ` (${r.cache.reason})` : "";
    const cells = [clock(r.time), r.model, r.surface, num(r.prompt_tokens), num(r.cached_tokens) + miss, r.generated,
      r.ttft !== null ? r.ttft.toFixed(3) + " s" : "–", num(r.tokens_per_s, 1), r.finish_reason || "–", status];
    cells.forEach((c, i) => {
      const td = el("td", i >= 3 && i <= 7 ? "n" : null, c);
      if (i === 9 && r.error) td.title = r.error;
      if (i === 4 && r.cache && r.cache.detail) td.title = r.cache.detail;
      tr.append(td);
    });
    if (r.progress) {
      const p = el("progress");
      p.max = r.progress[1];
      p.value = r.progress[0];
      tr.lastChild.append(p);
    }
    body.append(tr);
  }
}

// Ages and countdowns move with the clock, between snapshots that only come on change.
function tick() {
  for (const dd of document.querySelectorAll("dd[data-since]")) {
    const t = parseFloat(dd.dataset.since);
    if (!isNaN(t)) dd.textContent = dur(now() - t) + (dd.parentNode.classList.contains("ago") ? " ago" : "");
  }
  for (const dd of document.querySelectorAll("dd[data-until]")) {
    const t = parseFloat(dd.dataset.until);
    if (!isNaN(t)) dd.textContent = dur(t - now());
  }
}

// ---- playground ----------------------------------------------------------------------

let convo = [], inflight = null;

function renderModelPicker(models) {
  const sel = $("#pg-model");
  const keep = sel.value;
  const names = [];
  for (const m of models) if (!m.pending) names.push([m.name, m.name], ...m.aliases.map((a) => [a, `${a} → ${m.name}`]));
  const key = JSON.stringify(names);
  if (sel.dataset.key === key) return;
  sel.dataset.key = key;
  sel.replaceChildren(...names.map(([v, label]) => {
    const o = el("option", null, label);
    o.value = v;
    return o;
  }));
  if (names.some(([v]) => v === keep)) sel.value = keep;
}

function turnBox(role) {
  const box = el("div", "turn " + role);
  box.append(el("div", "who", role === "user" ? "You" : $("#pg-model").value));
  $("#pg-log").append(box);
  return box;
}

function scrollLog() {
  const log = $("#pg-log");
  log.scrollTop = log.scrollHeight;
}

async function send(text) {
  const model = $("#pg-model").value;
  if (!text.trim() || !model || inflight) return;
  convo.push({ role: "user", content: text });
  turnBox("user").append(el("div", "content", text));
  const box = turnBox("assistant");
  const content = el("div", "content");
  const statsLine = el("div", "turn-stats muted small", "waiting…");
  box.append(content, statsLine);
  scrollLog();
  const system = $("#pg-system").value.trim();
  const body = {
    model, stream: true, stream_options: { include_usage: true },
    messages: [...(system ? [{ role: "system", content: system }] : []), ...convo],
    temperature: parseFloat($("#pg-temperature").value),
    max_tokens: parseInt($("#pg-max-tokens").value, 10),
  };
  inflight = new AbortController();
  $("#pg-send").disabled = true;
  $("#pg-stop").disabled = false;
  const t0 = performance.now();
  let first = null, usage = null, answer = "", reasoning = null, reasoningText = "", tools = [], toolBox = null, error = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: inflight.signal,
      headers: headers({ "Content-Type": "application/json" }),
    });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      if (r.status === 401) askKey("That key was not accepted.");
      throw new Error((e.error && e.error.message) || `HTTP ${r.status}`);
    }
    await readSSE(r, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const d = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
      if ((d.content || d.reasoning_content || d.tool_calls) && first === null) first = performance.now();
      if (d.reasoning_content) {
        if (!reasoning) {
          reasoning = el("details", "reasoning");
          reasoning.append(el("summary", null, "Reasoning"), el("div", "content"));
          box.insertBefore(reasoning, content);
        }
        reasoningText += d.reasoning_content;
        reasoning.lastChild.textContent = reasoningText;
      }
      if (d.content) {
        answer += d.content;
        content.textContent = answer;
      }
      for (const tc of d.tool_calls || []) {
        const i = tc.index ?? tools.length;
        const t = (tools[i] = tools[i] || { id: tc.id, type: "function", function: { name: "", arguments: "" } });
        if (tc.id) t.id = tc.id;
        if (tc.function && tc.function.name) t.function.name += tc.function.name;
        if (tc.function && tc.function.arguments) t.function.arguments += tc.function.arguments;
        if (!toolBox) box.insertBefore((toolBox = el("div", "tool-calls")), statsLine);
        toolBox.replaceChildren(...tools.filter(Boolean).map((t) => {
          const c = el("div", "tool-call");
          c.append(el("span", "tool-name", "tool call: " + t.function.name), el("pre", null, t.function.arguments));
          return c;
        }));
      }
      statsLine.textContent = "streaming…";
      scrollLog();
    });
  } catch (e) {
    error = inflight.signal.aborted ? "stopped" : String(e.message || e);
  }
  const end = performance.now();
  const msg = { role: "assistant", content: answer };
  if (tools.length) msg.tool_calls = tools.filter(Boolean);
  if (answer || tools.length) convo.push(msg);
  else convo.pop();
  const parts = [];
  if (first !== null) parts.push(`TTFT ${((first - t0) / 1000).toFixed(2)} s`);
  if (usage) {
    const gen = usage.completion_tokens;
    if (first !== null && gen > 1 && end > first) parts.push(`${((gen - 1) / ((end - first) / 1000)).toFixed(1)} tok/s`);
    const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    parts.push(`${cached} cached of ${usage.prompt_tokens} prompt tokens`, `${gen} generated`);
    statsLine.dataset.cached = cached;
  }
  if (error) {
    box.append(el("div", "error-text", error));
    box.classList.add("failed");
  }
  statsLine.textContent = parts.join(" · ") || "–";
  inflight = null;
  $("#pg-send").disabled = false;
  $("#pg-stop").disabled = true;
  scrollLog();
}

// ---- wiring --------------------------------------------------------------------------

function showTab(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  $("#dashboard").hidden = name !== "dashboard";
  $("#playground").hidden = name !== "playground";
  if (name === "dashboard" && state) render();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => showTab(t.dataset.tab));
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("#key-input").value.trim());
    $("#key-input").value = "";
    connect();
  });
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    if (stream) stream.abort();
    askKey("");
  });
  $("#pg-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("#pg-input");
    const text = input.value;
    input.value = "";
    send(text);
  });
  $("#pg-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("#pg-form").requestSubmit();
    }
  });
  $("#pg-stop").addEventListener("click", () => inflight && inflight.abort());
  $("#pg-clear").addEventListener("click", () => {
    convo = [];
    $("#pg-log").replaceChildren();
  });
  setInterval(tick, 1000);
  connect();
});
