// lambdaemon's dashboard: draws the admin API's JSON. Every value from the daemon goes into the
// page as text (textContent), never as markup: a handler's output cannot inject into the page.
"use strict";

const $ = (id) => document.getElementById(id);
const VIEWS = ["login", "overview", "invocations", "invocation", "dead-letters", "tail"];
const state = { window: "1h", chartFunction: "", stats: null, functions: [], tail: null, charts: [] };

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) throw new Unauthorized();
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || body.message || `${response.status} ${path}`);
  return body;
}

function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell === null || cell === undefined ? "–" : String(cell);
    tr.append(td);
  }
  return tr;
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...rows);
  if (!rows.length) {
    const cols = tbody.closest("table").querySelectorAll("thead th").length;
    tbody.append(row([empty]));
    tbody.lastChild.firstChild.colSpan = cols;
  }
}

const ms = (v) => (v === null || v === undefined ? "–" : v < 10 ? `${v.toFixed(2)} ms` : `${Math.round(v)} ms`);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const link = (id) => el("a", id.slice(0, 13) + "…", { href: `#/invocation/${id}`, title: id, "data-id": id });
const status = (s) => el("span", s, { class: `status ${s}` });

function show(view) {
  for (const name of VIEWS) $(name).hidden = name !== view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("here", a.dataset.view === view);
  if (view !== "tail") stopTail();
}

// --- routing -------------------------------------------------------------------------------

async function route() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  try {
    await loadFunctions();
    if (path === "/") await overview();
    else if (path === "/invocations") await invocations(params);
    else if (path.startsWith("/invocation/")) await invocation(decodeURIComponent(path.slice(12)));
    else if (path === "/dead-letters") await deadLetters();
    else if (path === "/tail") await tail(params.get("function") || "");
    else location.hash = "#/";
  } catch (error) {
    if (error instanceof Unauthorized) return signIn();
    throw error;
  }
}

function signIn() {
  show("login");
  $("login-failed").hidden = new URLSearchParams(location.search).get("login") !== "failed";
  $("token").focus();
}

async function loadFunctions() {
  const body = await api("/v1/functions");
  state.functions = body.functions;
  const names = body.functions.map((f) => f.name);
  for (const [select, any] of [[$("chart-function"), "all functions"], [document.querySelector("#filters [name=function]"), "any"], [$("tail-function"), "every function"]]) {
    const chosen = select.value;
    select.replaceChildren(el("option", any, { value: "" }), ...names.map((n) => el("option", n, { value: n })));
    select.value = names.includes(chosen) ? chosen : "";
  }
}

// --- functions and charts ---------------------------------------------------------------------

async function overview() {
  show("overview");
  for (const b of document.querySelectorAll("#window button")) b.classList.toggle("here", b.dataset.window === state.window);
  const stats = await api(`/v1/stats?window=${state.window}`);
  state.stats = stats;
  const rows = state.functions.map((fn) => {
    const s = stats.functions[fn.name];
    const errors = s.invocations ? `${s.errors} (${(100 * s.error_rate).toFixed(1)}%)` : "0";
    const last = s.last ? el("span") : "never";
    if (s.last) last.append(link(s.last.id), " ", status(s.last.status), " ", when(s.last.queued_at));
    return row([
      el("a", fn.name, { href: `#/invocations?function=${encodeURIComponent(fn.name)}` }),
      el("span", s.state, { class: `state ${s.state}` }),
      `${s.workers.idle} idle, ${s.workers.busy} busy`,
      s.rate_per_min.toFixed(2),
      errors,
      ms(s.p50_ms),
      ms(s.p95_ms),
      last,
      triggers(fn, s),
    ]);
  });
  fill($("functions").tBodies[0], rows, "No functions are configured.");
  $("functions").tBodies[0].querySelectorAll("tr").forEach((tr, i) => state.functions[i] && tr.setAttribute("data-function", state.functions[i].name));
  drawCharts();
}

function triggers(fn, stats) {
  const list = el("ul", null, { class: "triggers" });
  const samples = state.stats.sources || [];
  const sample = (name, test) => samples.find((s) => s.name === name && test(s.labels));
  fn.triggers.forEach((t, i) => {
    const id = `${fn.name}#${i}`;
    const seen = stats.triggers[id];
    const what = t.schedule || t.topic || t.path || "";
    let health = !seen ? "idle" : seen.failing ? "failing" : "ok";
    let note = "";
    if (t.type === "mqtt") {
      const connected = sample("lambdaemon_mqtt_connected", () => true);
      if (connected && !connected.value) health = "disconnected";
    } else if (t.type === "cron") {
      const fired = sample("lambdaemon_cron_last_fire_timestamp_seconds", (l) => l.trigger === id);
      if (fired) note = ` last fire ${new Date(fired.value * 1000).toLocaleTimeString()}`;
    } else if (t.type === "files") {
      const pending = sample("lambdaemon_files_pending", (l) => l.folder.endsWith(t.path.replace(/^\.?\//, "")));
      if (pending) note = ` ${pending.value} pending`;
    }
    const item = el("li", `${t.type} ${what} `, { "data-trigger": id });
    item.append(el("span", health, { class: `health ${health}`, title: seen ? `${seen.invocations} events, ${seen.errors} errors; last ${when(seen.last_at)}` : "no event in this window" }));
    if (note) item.append(el("span", note, { class: "note" }));
    list.append(item);
  });
  if (!fn.triggers.length) list.append(el("li", "API only"));
  return list;
}

function series(name) {
  const fns = name ? [state.stats.functions[name]] : Object.values(state.stats.functions);
  const n = fns.length ? fns[0].series.invocations.length : 60;
  const sum = (key) => Array.from({ length: n }, (_, i) => fns.reduce((a, f) => a + f.series[key][i], 0));
  const mean = Array.from({ length: n }, (_, i) => {
    let total = 0, count = 0;
    for (const f of fns) if (f.series.duration_mean_ms[i] !== null) { total += f.series.duration_mean_ms[i] * f.series.invocations[i]; count += f.series.invocations[i]; }
    return count ? total / count : null;
  });
  const max = Array.from({ length: n }, (_, i) => {
    const values = fns.map((f) => f.series.duration_max_ms[i]).filter((v) => v !== null);
    return values.length ? Math.max(...values) : null;
  });
  const start = Date.parse(state.stats.start) / 1000;
  const times = Array.from({ length: n }, (_, i) => start + i * state.stats.bucket_s);
  return { times, count: sum("invocations"), errors: sum("errors"), mean, max };
}

function drawCharts() {
  if (!window.uPlot || !state.stats) return;
  for (const chart of state.charts) chart.destroy();
  const s = series($("chart-function").value);
  const width = Math.max(320, Math.min(560, $("overview").clientWidth / 2 - 24));
  const opts = (label1, label2, colors) => ({
    width, height: 200,
    series: [{}, { label: label1, stroke: colors[0], width: 2, points: { show: true, size: 5 } }, { label: label2, stroke: colors[1], width: 2, points: { show: true, size: 5 } }],
    axes: [{}, { size: 50 }],
  });
  state.charts = [
    new uPlot(opts("invocations", "errors", ["#2563eb", "#dc2626"]), [s.times, s.count, s.errors], $("chart-count")),
    new uPlot(opts("mean ms", "max ms", ["#059669", "#d97706"]), [s.times, s.mean, s.max], $("chart-duration")),
  ];
}

// --- invocations ------------------------------------------------------------------------------

const FILTERS = ["function", "status", "trigger", "version", "since", "until"];

async function invocations(params) {
  show("invocations");
  const form = $("filters");
  for (const name of FILTERS) form.elements[name].value = params.get(name) || "";
  state.query = new URLSearchParams();
  for (const name of FILTERS) if (params.get(name)) state.query.set(name, params.get(name));
  state.query.set("limit", params.get("limit") || "50");
  $("invocation-list").tBodies[0].replaceChildren();
  await morePage(null);
}

async function morePage(next) {
  const query = new URLSearchParams(state.query);
  if (next) query.set("next", next);
  const error = $("invocations-error");
  let body;
  try {
    body = await api(`/v1/invocations?${query}`);
  } catch (e) {
    if (e instanceof Unauthorized) throw e;
    error.textContent = e.message;
    error.hidden = false;
    return;
  }
  error.hidden = true;
  const tbody = $("invocation-list").tBodies[0];
  const rows = body.invocations.map((r) => row([when(r.queued_at), r.function, r.function_version, r.trigger, status(r.status), r.attempt, ms(r.duration_ms), link(r.id)]));
  if (!next) fill(tbody, rows, "No invocation matches.");
  else tbody.append(...rows);
  const older = $("older");
  older.hidden = !body.next;
  older.onclick = () => morePage(body.next).catch(report);
}

async function invocation(id) {
  show("invocation");
  const r = await api(`/v1/invocations/${encodeURIComponent(id)}`);
  $("inv-id").textContent = r.id;
  $("replayed").replaceChildren();
  const facts = [
    ["Function", `${r.function} (version ${r.function_version})`], ["Status", status(r.status)],
    ["Trigger", `${r.trigger}${r.trigger_id ? " " + r.trigger_id : ""} (${r.invocation_type})`],
    ["Queued", when(r.queued_at)], ["Started", when(r.started_at)], ["Ended", when(r.ended_at)],
    ["Duration", ms(r.duration_ms)], ["Billed", ms(r.billed_duration_ms)], ["Init", ms(r.init_duration_ms)],
    ["Max memory", r.max_memory_mb === null ? "–" : `${r.max_memory_mb} MB`],
    ["Error", r.error_type ? `${r.error_type}: ${r.error_message || ""}` : "–"],
    ["Dead letter", r.dead_letter_reason || "–"],
    ["Parent", r.parent_id ? link(r.parent_id) : "–"],
  ];
  $("inv-summary").tBodies[0].replaceChildren(...facts.map(([k, v]) => row([k, v])));
  const pretty = (v) => (v === null || v === undefined ? "–" : typeof v === "string" ? v : JSON.stringify(v, null, 2));
  $("inv-event").textContent = pretty(r.event);
  $("inv-result").textContent = pretty(r.result);
  $("inv-logs").textContent = r.logs || "(no output)";
  const attempts = (r.attempts || []).flatMap((a) => {
    const main = row([a.attempt, status(a.status), when(a.started_at), ms(a.duration_ms), a.error_type ? `${a.error_type}: ${a.error_message || ""}` : "–", a.worker_pid]);
    if (!a.logs) return [main];
    const logs = row([el("pre", a.logs, { class: "attempt-logs" })]);
    logs.firstChild.colSpan = 6;
    return [main, logs];
  });
  fill($("inv-attempts").tBodies[0], attempts, "It has not run yet.");
  $("replay").onclick = async () => {
    const done = await post(`/v1/invocations/${encodeURIComponent(r.id)}/replay`).catch(report);
    if (done) $("replayed").replaceChildren("Replayed as ", link(done.invocation_id));
  };
}

// --- dead letters ---------------------------------------------------------------------------

async function deadLetters() {
  show("dead-letters");
  const body = await api("/v1/dead-letters?limit=200");
  const rows = body.dead_letters.map((r) => {
    const button = el("button", "Redrive", { type: "button", class: "redrive", "data-id": r.id });
    button.onclick = () => redrive({ ids: [r.id] });
    return row([when(r.dead_lettered_at), r.function, status(r.status), r.dead_letter_reason, r.attempt, link(r.id), button]);
  });
  fill($("dead-letter-list").tBodies[0], rows, "No dead letters.");
  $("redrive-all").onclick = () => redrive({ all: true });
}

async function redrive(body) {
  const done = await post("/v1/dead-letters/redrive", body).catch(report);
  if (!done) return;
  $("redriven").textContent = `Redriven: ${done.redriven.length}` + (done.not_redriven.length ? `; not redriven: ${done.not_redriven.length}` : "");
  await deadLetters();
}

// --- live tail --------------------------------------------------------------------------------

const MAX_TAIL_LINES = 1000;

async function tail(fn) {
  show("tail");
  $("tail-function").value = fn;
  stopTail();
  const query = new URLSearchParams({ since: "5m", follow: "1", format: "sse" });
  if (fn) query.set("function", fn);
  const lines = $("tail-lines");
  lines.replaceChildren();
  const source = new EventSource(`/v1/logs?${query}`);
  state.tail = source;
  $("tail-state").textContent = "connecting…";
  source.onopen = () => { $("tail-state").textContent = "following"; };
  source.onerror = () => { $("tail-state").textContent = source.readyState === EventSource.CLOSED ? "closed" : "reconnecting…"; };
  const add = (text, cls) => {
    lines.append(el("div", text, { class: cls }));
    while (lines.childElementCount > MAX_TAIL_LINES) lines.firstChild.remove();
    lines.scrollTop = lines.scrollHeight;
  };
  source.onmessage = (event) => {
    const line = JSON.parse(event.data);
    add(`${new Date(line.time * 1000).toISOString().slice(11, 23)} ${line.function} ${line.line}`, `line ${line.status}`);
  };
  source.addEventListener("missed", (event) => add(`… ${JSON.parse(event.data).missed} lines missed (the page fell behind)`, "missed"));
}

function stopTail() {
  if (state.tail) state.tail.close();
  state.tail = null;
}

// --- wiring -----------------------------------------------------------------------------------

function report(error) {
  if (error instanceof Unauthorized) return signIn();
  alert(error.message);
}

async function start() {
  const session = await (await fetch("/ui/session", { credentials: "same-origin" })).json();
  $("logout").hidden = !session.token_required || !session.signed_in;
  for (const b of document.querySelectorAll("#window button")) {
    b.onclick = () => { state.window = b.dataset.window; overview().catch(report); };
  }
  $("chart-function").onchange = drawCharts;
  $("tail-function").onchange = () => { location.hash = `#/tail?function=${encodeURIComponent($("tail-function").value)}`; };
  $("filters").onsubmit = (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const name of FILTERS) if ($("filters").elements[name].value) query.set(name, $("filters").elements[name].value.trim());
    location.hash = `#/invocations?${query}`;
  };
  api("/health").then((h) => { $("health").textContent = h.status; $("health").className = `badge ${h.status}`; }).catch(() => {});
  window.addEventListener("hashchange", () => route().catch(report));
  if (session.token_required && !session.signed_in) return signIn();
  await route();
}

start().catch(report);
