// boxoffice operators' console. No library: the DOM is built with createElement and
// textContent only (nothing the API returns is parsed as HTML), charts are small SVGs.
// Every call goes to the admin JSON API of this origin with the session cookie; an action
// also carries the session's CSRF token.
"use strict";

const state = { session: null, feed: null, tab: "events", group: null, holdsDue: null };
const SVG = "http://www.w3.org/2000/svg";

// -- plumbing ------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(problem, status) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.code = problem.code || `http_${status}`;
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && state.session) headers["X-CSRF-Token"] = state.session.csrf_token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    if (resp.status === 401 && path !== "/console/session") signedOut();
    throw new ApiError(data, resp.status);
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function say(text, kind = "info") {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = kind;
  m.hidden = !text;
}

function failed(err) {
  say(err instanceof ApiError ? `${err.message} (${err.code})` : String(err), "error");
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function rows(table, items, cells, onclick) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...items.map((item) => {
    const tr = el("tr");
    for (const c of cells(item)) tr.append(c instanceof Node ? el("td", {}, c) : el("td", { text: c ?? "" }));
    if (onclick) { tr.classList.add("clickable"); tr.addEventListener("click", () => onclick(item)); }
    return tr;
  }));
  if (!items.length) body.replaceChildren(el("tr", {}, el("td", { colspan: "12", class: "empty", text: "nothing" })));
}

// -- session -------------------------------------------------------------------------------
function signedIn(session) {
  state.session = session;
  document.getElementById("signin").hidden = true;
  document.getElementById("tabs").hidden = false;
  document.getElementById("who").hidden = false;
  document.getElementById("actor").textContent = session.actor;
  document.getElementById("scope").textContent = session.scope;
  document.body.classList.toggle("read-only", session.scope !== "operate");
  startFeed();
  show(state.tab);
}

function signedOut() {
  state.session = null;
  stopFeed();
  for (const p of document.querySelectorAll(".panel")) p.hidden = true;
  document.getElementById("tabs").hidden = true;
  document.getElementById("who").hidden = true;
  document.getElementById("signin").hidden = false;
}

async function signIn(ev) {
  ev.preventDefault();
  const input = document.getElementById("token");
  try {
    const session = await api("POST", "/console/session", { token: input.value });
    input.value = "";
    say("");
    signedIn(session);
  } catch (err) { failed(err); }
}

async function signOut() {
  try { await api("DELETE", "/console/session"); } catch (err) { failed(err); }
  signedOut();
}

// -- live feed -----------------------------------------------------------------------------
function startFeed() {
  stopFeed();
  const live = document.getElementById("live");
  const feed = new EventSource("/console/stream");
  let opened = false;
  feed.addEventListener("open", () => {
    live.className = "on";
    // after a reconnect, what changed meanwhile was not sent: read the events once
    if (opened && state.tab === "events") loadEvents().catch(failed);
    opened = true;
  });
  feed.addEventListener("error", () => { live.className = "off"; });
  feed.addEventListener("inventory", (e) => drawEvent(JSON.parse(e.data)));
  // a payment changes the holds' figures: refreshed at most every 5 s, however many arrive
  feed.addEventListener("payment", () => {
    if (state.tab !== "holds" || state.holdsDue) return;
    state.holdsDue = setTimeout(() => { state.holdsDue = null; if (state.tab === "holds") loadHolds().catch(failed); }, 5000);
  });
  state.feed = feed;
}

function stopFeed() {
  if (state.feed) state.feed.close();
  state.feed = null;
  document.getElementById("live").className = "off";
}

// -- tabs ----------------------------------------------------------------------------------
const LOADERS = { events: loadEvents, holds: loadHolds, payments: () => {}, webhooks: loadWebhooks, errors: loadErrors };

function show(tab) {
  state.tab = tab;
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== tab;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("current", b.dataset.tab === tab);
  say("");
  Promise.resolve(LOADERS[tab]()).catch(failed);
}

// -- events --------------------------------------------------------------------------------
function capacityBar(ev) {
  const width = 300, height = 18, total = Math.max(ev.capacity, 1);
  const bar = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "bar", role: "img" });
  let x = 0;
  for (const [part, n] of [["sold", ev.sold], ["held", ev.held], ["available", ev.available]]) {
    const w = (Math.max(n, 0) / total) * width;
    const r = svg("rect", { x, y: 0, width: w, height, class: part });
    r.append(svg("title"));
    r.firstChild.textContent = `${part}: ${n}`;
    bar.append(r);
    x += w;
  }
  bar.setAttribute("aria-label", `${ev.sold} sold, ${ev.held} held, ${ev.available} available of ${ev.capacity}`);
  return bar;
}

function drawEvent(ev) {
  const list = document.getElementById("event-list");
  const row = el("div", { class: "event", "data-event-id": ev.id },
    el("div", { class: "name", text: ev.name }),
    capacityBar(ev),
    el("div", { class: "counts" },
      el("span", { class: "sold", "data-count": "sold", text: String(ev.sold) }), " sold · ",
      el("span", { class: "held", "data-count": "held", text: String(ev.held) }), " held · ",
      el("span", { class: "available", "data-count": "available", text: String(ev.available) }),
      ` available of ${ev.capacity} · ${(ev.price / 100).toFixed(2)} ${ev.currency.toUpperCase()}`),
    el("code", { class: "id", text: ev.id }));
  const old = list.querySelector(`[data-event-id="${CSS.escape(ev.id)}"]`);
  if (old) old.replaceWith(row); else list.prepend(row);
}

async function loadEvents() {
  const { events } = await api("GET", "/v1/admin/events?limit=50");
  document.getElementById("event-list").replaceChildren();
  for (const ev of events.reverse()) drawEvent(ev);
}

async function createEvent(ev) {
  ev.preventDefault();
  const f = new FormData(ev.target);
  try {
    const created = await api("POST", "/v1/admin/events", {
      name: f.get("name"), capacity: Number(f.get("capacity")),
      price: Number(f.get("price")), currency: String(f.get("currency")).toLowerCase(),
    });
    drawEvent(created);
    ev.target.reset();
    say(`Created ${created.name} (${created.id})`);
  } catch (err) { failed(err); }
}

// -- holds ---------------------------------------------------------------------------------
function lagChart(points, minutes) {
  const width = 600, height = 120, pad = 20;
  const now = Date.now(), from = now - minutes * 60000;
  const top = Math.max(1, ...points.map((p) => p.max_seconds));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + pad}`, width, height: height + pad, class: "lag", role: "img" });
  chart.append(svg("line", { x1: 0, y1: height, x2: width, y2: height, class: "axis" }));
  const label = svg("text", { x: 2, y: 12, class: "label" });
  label.textContent = `max ${top.toFixed(2)} s`;
  chart.append(label);
  if (!points.length) {
    const none = svg("text", { x: width / 2 - 90, y: height / 2, class: "label" });
    none.textContent = "no hold expired in this time";
    chart.append(none);
  }
  const step = width / minutes;
  for (const p of points) {
    const x = ((new Date(p.minute).getTime() - from) / (now - from)) * width;
    const h = (p.max_seconds / top) * (height - 16);
    const r = svg("rect", { x: Math.max(0, x - step), y: height - h, width: Math.max(step - 1, 1), height: h, class: "lagbar" });
    r.append(svg("title"));
    r.firstChild.textContent = `${when(p.minute)}: ${p.holds} holds, max ${p.max_seconds.toFixed(2)} s, avg ${p.avg_seconds.toFixed(2)} s`;
    chart.append(r);
  }
  const ago = svg("text", { x: 2, y: height + 14, class: "label" });
  ago.textContent = `${minutes} min ago`;
  const nowLabel = svg("text", { x: width - 30, y: height + 14, class: "label" });
  nowLabel.textContent = "now";
  chart.append(ago, nowLabel);
  return chart;
}

async function loadHolds() {
  const [stats, lag, runs] = await Promise.all([
    api("GET", "/v1/admin/reservations/stats"),
    api("GET", "/v1/admin/reservations/expiry-lag?minutes=60"),
    api("GET", "/v1/admin/reaper/runs?limit=20"),
  ]);
  const dl = document.getElementById("hold-stats");
  dl.replaceChildren();
  for (const [k, v] of [["active", stats.active], ["overdue", stats.overdue],
    ["next expiry", when(stats.next_expiry)], ["oldest active", when(stats.oldest_active_hold)],
    ["expired", stats.expired], ["completed", stats.completed], ["cancelled", stats.cancelled]]) {
    dl.append(el("div", { "data-stat": k }, el("dt", { text: k }), el("dd", { text: String(v) })));
  }
  document.getElementById("lag-chart").replaceChildren(lagChart(lag.points, lag.minutes));
  rows("reaper-runs", runs.runs, (r) => [when(r.started_at), r.kind, String(r.expired),
    r.finished_at ? `${((new Date(r.finished_at) - new Date(r.started_at)) / 1000).toFixed(3)} s` : "running",
    r.error || ""]);
}

// -- payments ------------------------------------------------------------------------------
async function searchPayments(ev) {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const q = new URLSearchParams({ limit: "100" });
  for (const k of ["reservation_id", "idempotency_key"]) if (f.get(k)) q.set(k, String(f.get(k)).trim());
  try {
    const { items } = await api("GET", `/v1/admin/payments?${q}`);
    rows("payment-log", items, (p) => [p.idempotency_key, p.reservation_id, el("span", { class: `point ${p.recovery_point}`, text: p.recovery_point }),
      p.stripe_payment_intent_id, p.amount == null ? "" : `${p.amount} ${p.currency}`,
      p.response_status == null ? "" : String(p.response_status), String(p.attempts), p.last_error, when(p.created_at)]);
  } catch (err) { failed(err); }
}

// -- webhooks ------------------------------------------------------------------------------
function webhookFilter() {
  const f = new FormData(document.getElementById("webhook-filter"));
  return { status: f.get("status") || null, type: String(f.get("type") || "").trim() || null };
}

async function loadWebhooks() {
  const { status, type } = webhookFilter();
  const q = new URLSearchParams({ limit: "100" });
  if (status) q.set("status", status);
  if (type) q.set("type", type);
  const { events } = await api("GET", `/v1/admin/webhooks/events?${q}`);
  rows("webhook-list", events, (e) => [e.event_id, e.event_type,
    el("span", { class: `status ${e.processing_status}`, text: e.processing_status }),
    String(e.attempts), when(e.received_at), (e.last_error || "").slice(0, 80),
    ["failed", "received"].includes(e.processing_status) && state.session.scope === "operate"
      ? el("button", { type: "button", class: "replay", text: "Replay", onclick: (c) => { c.stopPropagation(); replayOne(e.event_id); } })
      : ""], (e) => showWebhook(e.event_id));
}

async function showWebhook(eventId) {
  try {
    const { event, payload } = await api("GET", `/v1/admin/webhooks/events/${encodeURIComponent(eventId)}`);
    const box = document.getElementById("webhook-detail");
    box.querySelector(".title").textContent = `${event.event_id} · ${event.event_type} · ${event.processing_status}`;
    box.querySelector(".last-error").textContent = event.last_error || "—";
    box.querySelector(".payload").textContent = JSON.stringify(payload, null, 2);
    box.hidden = false;
  } catch (err) { failed(err); }
}

async function replayOne(eventId) {
  try {
    const result = await api("POST", `/v1/admin/webhooks/events/${encodeURIComponent(eventId)}/replay`);
    say(`Replayed ${eventId}: ${result.outcome}`, result.outcome === "failed" ? "error" : "info");
    await loadWebhooks();
    await showWebhook(eventId);  // its status and last error as they are now
  } catch (err) { failed(err); }
}

async function replayAll() {
  const { status, type } = webhookFilter();
  if (status !== "failed" && status !== "received") {
    say("Replay all applies to failed or received events: choose one of them", "error");
    return;
  }
  const box = document.getElementById("replay-progress");
  const bar = box.querySelector("progress"), text = box.querySelector(".text");
  box.hidden = false; bar.value = 0; text.textContent = "starting";
  try {
    const resp = await fetch("/v1/admin/webhooks/replay", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.session.csrf_token },
      body: JSON.stringify(type ? { status, type } : { status }),
    });
    if (!resp.ok) throw new ApiError(await resp.json().catch(() => ({})), resp.status);
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffered = "", last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        last = JSON.parse(buffered.slice(0, nl));
        buffered = buffered.slice(nl + 1);
        bar.max = Math.max(last.total, 1);
        bar.value = last.done;
        text.textContent = last.finished
          ? `done: ${last.succeeded} applied, ${last.failed} failed of ${last.total}`
          : `${last.done} of ${last.total}: ${last.event_id} ${last.outcome}`;
      }
    }
    if (last && last.total === 0) text.textContent = "nothing to replay";
    document.getElementById("webhook-detail").hidden = true;
    await loadWebhooks();
  } catch (err) { failed(err); }
}

// -- errors --------------------------------------------------------------------------------
function sparkline(counts) {
  const width = 96, height = 20, top = Math.max(1, ...counts);
  const line = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "spark", role: "img" });
  const pts = counts.map((n, i) => `${(i / Math.max(counts.length - 1, 1)) * width},${height - 1 - (n / top) * (height - 2)}`);
  line.append(svg("polyline", { points: pts.join(" "), class: "sparkline" }));
  line.setAttribute("aria-label", `reports per hour, last 24 h: ${counts.join(", ")}`);
  return line;
}

async function loadErrors() {
  const f = new FormData(document.getElementById("error-filter"));
  const q = new URLSearchParams({ limit: "100" });
  if (f.get("status")) q.set("status", String(f.get("status")));
  const { groups } = await api("GET", `/v1/admin/errors?${q}`);
  rows("error-groups", groups, (g) => [g.title, el("span", { class: `level ${g.level}`, text: g.level }),
    g.service, String(g.count), sparkline(g.hourly.length ? g.hourly : new Array(24).fill(0)),
    when(g.last_seen), g.status], (g) => showGroup(g.id));
}

async function showGroup(groupId) {
  try {
    const { group, events } = await api("GET", `/v1/admin/errors/${encodeURIComponent(groupId)}?events=20`);
    state.group = group.id;
    const box = document.getElementById("error-detail");
    box.querySelector(".title").textContent = group.title;
    box.querySelector(".meta").textContent =
      `${group.level} · ${group.service} · ${group.count} reports · ${group.status} · first ${when(group.first_seen)} · last ${when(group.last_seen)}`;
    const latest = events[0] || {};
    box.querySelector(".stacktrace").textContent = latest.stacktrace || "—";
    box.querySelector(".context").textContent = latest.context ? JSON.stringify(latest.context, null, 2) : "—";
    const body = box.querySelector(".reports tbody");
    body.replaceChildren(...events.map((e) => el("tr", {}, el("td", { text: when(e.timestamp) }),
      el("td", { text: e.service }), el("td", { text: e.error_message }),
      el("td", { text: e.release || "" }), el("td", { text: e.request_id || "" }))));
    box.hidden = false;
  } catch (err) { failed(err); }
}

async function setGroup(action) {
  if (!state.group) return;
  try {
    const group = await api("POST", `/v1/admin/errors/${encodeURIComponent(state.group)}/${action}`);
    say(`${group.title}: ${group.status}`);
    await loadErrors();
    await showGroup(group.id);
  } catch (err) { failed(err); }
}

// -- start ---------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("signin-form").addEventListener("submit", signIn);
  document.getElementById("sign-out").addEventListener("click", signOut);
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => show(b.dataset.tab));
  document.getElementById("create-event").addEventListener("submit", createEvent);
  document.getElementById("holds-refresh").addEventListener("click", () => loadHolds().catch(failed));
  document.getElementById("payment-search").addEventListener("submit", searchPayments);
  document.getElementById("webhook-filter").addEventListener("submit", (e) => { e.preventDefault(); loadWebhooks().catch(failed); });
  document.getElementById("replay-all").addEventListener("click", replayAll);
  document.getElementById("error-filter").addEventListener("submit", (e) => { e.preventDefault(); loadErrors().catch(failed); });
  document.getElementById("resolve-group").addEventListener("click", () => setGroup("resolve"));
  document.getElementById("ignore-group").addEventListener("click", () => setGroup("ignore"));
  try {
    signedIn(await api("GET", "/console/session"));
  } catch {
    signedOut();
  }
});
