// EMS dashboard: small vanilla JS, no build step. REST with the session cookie (same origin),
// everything live from /ws/dashboard. Text from the server only ever goes into textContent.
"use strict";

const WINDOW_MS = 5 * 60 * 1000; // charts show the last five minutes
const ALERTING_MS = 10 * 60 * 1000; // a device with an alert this recent counts as alerting
const HEADLINE = ["power", "voltage", "soc", "batteryVoltage", "speed", "engineRpm", "temperature"];

const state = {
  me: null, // {username, role}
  devices: new Map(), // id -> device json (+ latest, alertAt)
  series: new Map(), // id -> Map(metric -> [[ts, value], ...])
  alerts: new Map(), // id -> [{ts, level, code, message}], newest first
  commands: new Map(), // command id -> command object
  configStatus: new Map(), // id -> config_status message
  lagged: 0,
};

// --- small DOM helpers ---------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && key !== "list") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function fill(node, ...children) {
  // replaceChildren would show a null as the text "null": leave the holes out.
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function fmtTime(ms) {
  if (!ms) return "never";
  const d = new Date(ms);
  const age = Date.now() - ms;
  if (age >= 0 && age < 60_000) return `${Math.max(0, Math.round(age / 1000))} s ago`;
  if (age >= 0 && age < 86_400_000) return d.toLocaleTimeString();
  return d.toLocaleString();
}

function fmtValue(v) {
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(2);
  }
  if (v && typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function notice(text, isError) {
  const box = $("notice");
  box.textContent = text;
  box.className = "banner " + (isError ? "lag" : "info");
  box.hidden = !text;
  clearTimeout(notice.timer);
  if (text) notice.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

// --- REST ------------------------------------------------------------------------------------

async function api(method, path, body) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  if (response.status !== 204) data = await response.json().catch(() => null);
  if (response.status === 401 && path !== "/api/auth/login") {
    loggedOut();
    throw new Error("session ended: log in again");
  }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function guarded(fn) {
  return async (event) => {
    if (event && event.preventDefault) event.preventDefault();
    try {
      await fn(event);
    } catch (err) {
      notice(err.message || String(err), true);
    }
  };
}

// --- the live link ------------------------------------------------------------------------

const link = { ws: null, backoff: 500, timer: null, wanted: false };

function setLive(up) {
  $("conn").hidden = up || !link.wanted;
  const badge = $("live");
  badge.dataset.state = up ? "up" : "down";
  badge.textContent = up ? "live" : "offline";
}

function connect() {
  link.wanted = true;
  if (link.ws || link.timer) return;
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/ws/dashboard");
  let opened = false;
  link.ws = ws;
  ws.onopen = () => {
    opened = true;
    link.backoff = 500;
    setLive(true);
    ws.send(JSON.stringify({ type: "subscribe", devices: ["*"] }));
    loadDevices().then(loadRecentAlerts).catch(() => {});
  };
  ws.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    for (const message of frame.type === "batch" ? frame.messages : [frame]) handle(message);
    scheduleRefresh();
  };
  ws.onclose = () => {
    link.ws = null;
    setLive(false);
    if (!link.wanted) return;
    if (!opened) checkSession();
    const delay = link.backoff * (0.8 + Math.random() * 0.4);
    link.backoff = Math.min(link.backoff * 2, 8000);
    link.timer = setTimeout(() => {
      link.timer = null;
      if (link.wanted) connect();
    }, delay);
  };
}

function disconnect() {
  link.wanted = false;
  clearTimeout(link.timer);
  link.timer = null;
  if (link.ws) link.ws.close(1000);
  link.ws = null;
  setLive(false);
}

async function checkSession() {
  // A refused upgrade may mean the session ended: ask REST (a network error means "hub down").
  try {
    await fetch("/api/auth/me", { credentials: "same-origin" }).then((r) => {
      if (r.status === 401) loggedOut();
    });
  } catch {
    /* the hub is down; keep trying */
  }
}

function device(id) {
  let d = state.devices.get(id);
  if (!d) {
    d = { device_id: id, online: false, last_seen: null, latest: null, alertAt: 0 };
    state.devices.set(id, d);
    loadDevices().catch(() => {}); // a device we have not seen yet (created since): its record
  }
  return d;
}

function addSample(id, ts, data) {
  let metrics = state.series.get(id);
  if (!metrics) state.series.set(id, (metrics = new Map()));
  for (const [name, value] of Object.entries(data || {})) {
    if (typeof value !== "number" || !Number.isFinite(value)) continue;
    let points = metrics.get(name);
    if (!points) metrics.set(name, (points = []));
    if (points.length && points[points.length - 1][0] >= ts) {
      if (points.some((p) => p[0] === ts)) continue;
      points.push([ts, value]);
      points.sort((a, b) => a[0] - b[0]);
    } else {
      points.push([ts, value]);
    }
    const cutoff = Date.now() - WINDOW_MS;
    while (points.length > 2 && points[0][0] < cutoff) points.shift();
  }
}

function addAlert(id, item) {
  let list = state.alerts.get(id);
  if (!list) state.alerts.set(id, (list = []));
  list.unshift(item);
  if (list.length > 100) list.length = 100;
  if (item.kind !== "event") device(id).alertAt = Date.now(); // live: it fired just now
}

function handle(message) {
  switch (message.type) {
    case "subscribed":
      for (const snap of message.snapshot || []) {
        const d = device(snap.device_id);
        d.online = snap.online;
        d.last_seen = snap.last_seen;
        if (snap.latest) {
          d.latest = snap.latest;
          addSample(snap.device_id, snap.latest.ts, snap.latest.data);
        }
      }
      break;
    case "telemetry_update": {
      const d = device(message.device_id);
      if (!d.latest || message.ts >= d.latest.ts) d.latest = { ts: message.ts, data: message.data };
      d.last_seen = Math.max(d.last_seen || 0, Date.now());
      addSample(message.device_id, message.ts, message.data);
      break;
    }
    case "alert":
      addAlert(message.device_id, { ts: message.ts, ...message.alert, data: message.data });
      break;
    case "event":
      addAlert(message.device_id, {
        kind: "event", ts: message.ts, level: message.level, code: message.code,
        message: message.message,
      });
      break;
    case "device_status": {
      const d = device(message.device_id);
      d.online = message.online;
      d.last_seen = message.ts;
      break;
    }
    case "command_status":
      state.commands.set(message.command.id, message.command);
      break;
    case "config_status":
      state.configStatus.set(message.device_id, message);
      if (current.view && current.view.onConfig) current.view.onConfig(message.device_id);
      break;
    case "notification":
      notice(`${message.event}: ${JSON.stringify(message.data)}`);
      break;
    case "lagged":
      state.lagged += message.dropped || 0;
      $("lagged-text").textContent =
        `Live view lagged: ${state.lagged} update(s) dropped because this page read too slowly.`;
      $("lagged").hidden = false;
      break;
    case "error":
      notice(`live link: ${message.message}`, true);
      break;
    default:
      break;
  }
}

async function loadDevices() {
  if (loadDevices.running) return loadDevices.running;
  loadDevices.running = (async () => {
    try {
      const data = await api("GET", "/api/devices");
      const seen = new Set();
      for (const record of data.devices) {
        seen.add(record.device_id);
        const old = state.devices.get(record.device_id) || {};
        state.devices.set(record.device_id, {
          ...record,
          latest: old.latest || null,
          alertAt: old.alertAt || 0,
          last_seen: Math.max(old.last_seen || 0, record.last_seen || 0) || null,
        });
      }
      for (const id of [...state.devices.keys()]) if (!seen.has(id)) state.devices.delete(id);
      scheduleRefresh();
    } finally {
      loadDevices.running = null;
    }
  })();
  return loadDevices.running;
}

async function loadRecentAlerts() {
  const data = await api("GET", `/api/alerts?since=${Date.now() - ALERTING_MS}`);
  for (const a of data.alerts) {
    const d = state.devices.get(a.device_id);
    if (d) d.alertAt = Math.max(d.alertAt || 0, Math.min(a.ts, Date.now()));
  }
  scheduleRefresh();
}

// --- rendering ---------------------------------------------------------------------------------

const current = { view: null };
let refreshPending = false;

function scheduleRefresh() {
  if (refreshPending) return;
  refreshPending = true;
  requestAnimationFrame(() => {
    refreshPending = false;
    if (current.view && current.view.refresh) current.view.refresh();
  });
}

function headline(data) {
  const keys = Object.keys(data || {}).filter((k) => typeof data[k] === "number");
  const picked = HEADLINE.filter((k) => keys.includes(k));
  for (const k of keys) if (picked.length < 3 && !picked.includes(k)) picked.push(k);
  return picked.slice(0, 3);
}

function isAlerting(d) {
  return d.alertAt && Date.now() - d.alertAt < ALERTING_MS;
}

function fleetView() {
  const counts = el("div", { class: "counts" });
  const tbody = el("tbody");
  const root = el(
    "section",
    {},
    el("h1", { text: "Fleet" }),
    counts,
    el(
      "div",
      { class: "card table-wrap" },
      el(
        "table",
        { class: "fleet" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            el("th", { text: "Device" }),
            el("th", { text: "Status" }),
            el("th", { text: "Last seen" }),
            el("th", { class: "wide", text: "Firmware" }),
            el("th", { text: "Latest" }),
          ),
        ),
        tbody,
      ),
    ),
  );
  function refresh() {
    const all = [...state.devices.values()].sort((a, b) => a.device_id.localeCompare(b.device_id));
    const online = all.filter((d) => d.online).length;
    const alerting = all.filter(isAlerting).length;
    fill(counts, 
      ...[
        ["Devices", all.length, "count-total"],
        ["Online", online, "count-online"],
        ["Offline", all.length - online, "count-offline"],
        ["Alerting", alerting, "count-alerting"],
      ].map(([label, n, id]) => el("div", { class: "count", id }, el("b", { text: n }), label)),
    );
    if (!all.length) {
      fill(tbody, el("tr", {}, el("td", { colSpan: 5, class: "muted", text: "No devices yet." })));
      return;
    }
    fill(tbody, 
      ...all.map((d) => {
        const data = d.latest ? d.latest.data : {};
        return el(
          "tr",
          { "data-device": d.device_id },
          el(
            "td",
            {},
            el("a", { href: `#/device/${encodeURIComponent(d.device_id)}`, text: d.device_id }),
            d.name ? el("div", { class: "muted", text: d.name }) : null,
          ),
          el(
            "td",
            {},
            el("span", { class: "badge status" + (d.online ? " online" : ""), text: d.online ? "online" : "offline" }),
            isAlerting(d) ? el("span", { class: "badge alerting", text: "alert" }) : null,
          ),
          el("td", { class: "seen", text: fmtTime(d.last_seen) }),
          el("td", { class: "wide", text: d.firmware || "—" }),
          el(
            "td",
            {},
            headline(data).map((k) =>
              el("span", { class: "metric", "data-metric": k }, el("span", { class: "k", text: k }), el("span", { class: "v", text: fmtValue(data[k]) })),
            ),
          ),
        );
      }),
    );
  }
  const tick = setInterval(refresh, 5000); // "x s ago" ages; the data itself is pushed
  return { root, refresh, destroy: () => clearInterval(tick) };
}

function drawChart(canvas, points) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 240;
  const height = canvas.clientHeight || 90;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const now = Date.now();
  const shown = points.filter((p) => p[0] >= now - WINDOW_MS);
  if (!shown.length) return;
  // Until five minutes have gathered, the line spans what there is (at least ten seconds).
  const t0 = Math.min(shown[0][0], now - 10_000);
  const span = Math.max(now, shown[shown.length - 1][0]) - t0;
  let lo = Math.min(...shown.map((p) => p[1]));
  let hi = Math.max(...shown.map((p) => p[1]));
  if (hi === lo) { hi += 1; lo -= 1; }
  const pad = 4;
  const x = (t) => pad + ((t - t0) / span) * (width - 2 * pad);
  const y = (v) => height - pad - ((v - lo) / (hi - lo)) * (height - 2 * pad);
  ctx.strokeStyle = "#d9dde3";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(0, height - 0.5);
  ctx.lineTo(width, height - 0.5);
  ctx.stroke();
  ctx.strokeStyle = "#1f5fbf";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  shown.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
  ctx.stroke();
  ctx.fillStyle = "#667085";
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(fmtValue(hi), pad, 10);
  ctx.fillText(fmtValue(lo), pad, height - pad - 1);
}

function deviceView(id) {
  const path = `/api/devices/${encodeURIComponent(id)}`;
  const head = el("div", { class: "card", id: "device-head" });
  const charts = el("div", { class: "grid", id: "charts" });
  const chartNodes = new Map();
  const alertFeed = el("ul", { class: "feed", id: "alerts" });
  const commandList = el("ul", { class: "feed", id: "commands" });
  const configShow = el("div", { id: "config" });
  const configEdit = el("textarea", { id: "config-edit", spellcheck: false, "aria-label": "desired config (JSON)" });
  const artifactSelect = el("select", { id: "ota-artifact", "aria-label": "artifact" });
  const deviceCommandIds = new Set();

  const cmdName = el("input", { id: "command-name", value: "ping", required: true, "aria-label": "command name" });
  const cmdParams = el("input", { id: "command-params", placeholder: '{"key": "value"} (optional)', "aria-label": "command params (JSON)" });
  const sendCommand = guarded(async () => {
    const body = { name: cmdName.value.trim() };
    if (cmdParams.value.trim()) body.params = JSON.parse(cmdParams.value);
    const command = await api("POST", `${path}/commands`, body);
    deviceCommandIds.add(command.id);
    if (!state.commands.has(command.id)) state.commands.set(command.id, command);
    refresh();
  });
  const pushConfig = guarded(async () => {
    const config = JSON.parse(configEdit.value || "{}");
    const doc = await api("PUT", `${path}/config`, { config });
    showConfig(doc);
    notice(`config version ${doc.desired.version} pushed`);
  });
  const startOta = guarded(async () => {
    if (!artifactSelect.value) throw new Error("no artifact chosen (upload one first)");
    const command = await api("POST", `${path}/software-update`, { sha256: artifactSelect.value });
    deviceCommandIds.add(command.id);
    state.commands.set(command.id, command);
    refresh();
  });
  const historyMinutes = el("input", { id: "history-minutes", type: "number", min: 1, value: 60, "aria-label": "minutes of history" });
  const requestHistory = guarded(async () => {
    const to = Date.now();
    const from = to - Number(historyMinutes.value || 60) * 60_000;
    const command = await api("POST", `${path}/history-request`, { from, to });
    deviceCommandIds.add(command.id);
    state.commands.set(command.id, command);
    refresh();
  });

  const root = el(
    "section",
    {},
    el("p", {}, el("a", { href: "#/", text: "← Fleet" })),
    head,
    el("h2", { text: "Live metrics (last 5 minutes)" }),
    charts,
    el(
      "div",
      { class: "two" },
      el("div", { class: "card" }, el("h2", { text: "Alerts and events" }), alertFeed),
      el(
        "div",
        { class: "card" },
        el("h2", { text: "Commands" }),
        el("form", { class: "row", id: "command-form", onsubmit: sendCommand },
          el("label", {}, "name", cmdName), el("label", {}, "params", cmdParams),
          el("button", { type: "submit", text: "Send" })),
        commandList,
      ),
      el(
        "div",
        { class: "card" },
        el("h2", { text: "Config" }),
        configShow,
        el("form", { class: "stack", onsubmit: pushConfig },
          el("label", {}, "desired config (JSON)", configEdit),
          el("button", { type: "submit", text: "Push config" })),
      ),
      el(
        "div",
        { class: "card" },
        el("h2", { text: "Software update and history" }),
        el("form", { class: "row", onsubmit: startOta },
          el("label", {}, "uploaded artifact", artifactSelect),
          el("button", { type: "submit", text: "Start update" })),
        el("p", {}),
        el("form", { class: "row", onsubmit: requestHistory },
          el("label", {}, "last minutes", historyMinutes),
          el("button", { type: "submit", text: "Request history" })),
      ),
    ),
  );

  function showConfig(doc) {
    const desired = doc.desired || {};
    const reported = doc.reported || {};
    fill(configShow, 
      el("div", { class: "muted", text: `desired v${desired.version ?? "—"} · reported v${reported.version ?? "—"} (${reported.status || "unknown"})` }),
      reported.error ? el("div", { class: "error", text: reported.error }) : null,
      el("pre", { text: JSON.stringify(desired.config ?? {}, null, 2) }),
    );
    if (document.activeElement !== configEdit) configEdit.value = JSON.stringify(desired.config ?? {}, null, 2);
  }
  const loadConfig = () => api("GET", `${path}/config`).then(showConfig).catch(() => {});

  function refresh() {
    const d = state.devices.get(id);
    if (!d) {
      fill(head, el("h1", { text: id }), el("p", { class: "muted", text: "Unknown device (or not visible to you)." }));
    } else {
      fill(head, 
        el("h1", { text: d.name ? `${d.name} (${d.device_id})` : d.device_id }),
        el("span", { class: "badge status" + (d.online ? " online" : ""), id: "device-status", text: d.online ? "online" : "offline" }),
        isAlerting(d) ? el("span", { class: "badge alerting", text: "alert" }) : null,
        el("span", { class: "muted", text: `  last seen ${fmtTime(d.last_seen)} · firmware ${d.firmware || "—"}` }),
      );
    }
    const metrics = state.series.get(id) || new Map();
    for (const name of [...metrics.keys()].sort()) {
      let node = chartNodes.get(name);
      if (!node) {
        node = { value: el("span", { class: "value" }), canvas: el("canvas", { "aria-label": `${name} chart` }) };
        node.root = el("div", { class: "chart", "data-metric": name },
          el("div", { class: "head" }, el("span", { text: name }), node.value), node.canvas);
        chartNodes.set(name, node);
        fill(charts, ...[...chartNodes.keys()].sort().map((k) => chartNodes.get(k).root));
      }
      const points = metrics.get(name);
      node.value.textContent = points.length ? fmtValue(points[points.length - 1][1]) : "—";
      drawChart(node.canvas, points);
    }
    if (!chartNodes.size) fill(charts, el("p", { class: "muted", text: "No samples in the last 5 minutes." }));
    const alerts = state.alerts.get(id) || [];
    fill(alertFeed, 
      ...(alerts.length ? alerts.slice(0, 50).map((a) =>
        el("li", { class: "alert-item" },
          el("span", { class: `lvl-${a.level}`, text: a.code }), " ",
          el("span", { text: a.message }), " ",
          el("span", { class: "muted", text: fmtTime(a.ts) }))) : [el("li", { class: "muted", text: "No alerts." })]),
    );
    const commands = [...state.commands.values()]
      .filter((c) => c.device_id === id)
      .sort((a, b) => b.created_at - a.created_at)
      .slice(0, 15);
    fill(commandList, 
      ...(commands.length ? commands.map((c) =>
        el("li", { class: "command", "data-command": c.id },
          el("b", { text: c.name }), " ",
          el("span", { class: `command-status status-${c.status}`, text: c.status }),
          c.progress != null && c.status === "running" ? el("span", { class: "muted", text: ` ${c.progress}%` }) : null,
          c.error ? el("div", { class: "error", text: typeof c.error === "string" ? c.error : JSON.stringify(c.error) }) : null,
          c.result != null ? el("pre", { text: JSON.stringify(c.result) }) : null)) : [el("li", { class: "muted", text: "No commands yet." })]),
    );
  }

  // Seed from REST; live updates arrive over the link meanwhile and merge in.
  const since = Date.now() - WINDOW_MS;
  api("GET", `${path}/telemetry?since=${since}&limit=2000`).then((data) => {
    for (const s of data.samples) addSample(id, s.ts, s.data);
    scheduleRefresh();
  }).catch((err) => notice(err.message, true));
  api("GET", `/api/alerts?device_id=${encodeURIComponent(id)}&since=${Date.now() - 86_400_000}`).then((data) => {
    const known = new Set((state.alerts.get(id) || []).map((a) => `${a.ts}/${a.code}`));
    const older = data.alerts.filter((a) => !known.has(`${a.ts}/${a.code}`)).reverse();
    state.alerts.set(id, [...(state.alerts.get(id) || []), ...older].sort((a, b) => b.ts - a.ts));
    scheduleRefresh();
  }).catch(() => {});
  api("GET", `${path}/commands`).then((data) => {
    for (const c of data.commands) if (!state.commands.has(c.id)) state.commands.set(c.id, c);
    scheduleRefresh();
  }).catch(() => {});
  loadConfig();
  if (state.me && state.me.role === "admin") {
    api("GET", "/api/artifacts").then((data) => {
      fill(artifactSelect, 
        el("option", { value: "", text: data.artifacts.length ? "choose…" : "no artifacts uploaded" }),
        ...data.artifacts.map((a) => el("option", { value: a.sha256, text: `${a.version} (${a.sha256.slice(0, 12)}…, ${a.size} B)` })),
      );
    }).catch(() => {});
  } else {
    fill(artifactSelect, el("option", { value: "", text: "(admins list artifacts)" }));
  }
  const tick = setInterval(refresh, 2000); // charts scroll with time even between samples
  return {
    root,
    refresh,
    onConfig: (deviceId) => { if (deviceId === id) loadConfig(); },
    destroy: () => clearInterval(tick),
  };
}

function tokenBox(deviceId, token) {
  const code = el("code", { id: "new-token", text: token });
  const copy = el("button", {
    type: "button", class: "plain", text: "Copy",
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(token);
        copy.textContent = "Copied";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(code);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        copy.textContent = "Selected: press Ctrl+C";
      }
    },
  });
  return el("div", { class: "token", id: "token-box" },
    el("span", { text: `Token for ${deviceId} (shown once):` }), code, copy);
}

function adminView() {
  const tokenArea = el("div", { id: "token-area" });
  const deviceRows = el("tbody");
  const userRows = el("tbody");
  const newId = el("input", { id: "new-device-id", required: true, pattern: "[A-Za-z0-9_.\\-]{1,64}", "aria-label": "device id" });
  const newName = el("input", { id: "new-device-name", "aria-label": "device name" });
  const newOwner = el("input", { id: "new-device-owner", "aria-label": "owner" });
  const userName = el("input", { id: "new-user-name", required: true, "aria-label": "username" });
  const userPassword = el("input", { id: "new-user-password", type: "password", required: true, minLength: 8, autocomplete: "new-password", "aria-label": "password" });
  const userRole = el("select", { id: "new-user-role", "aria-label": "role" },
    ["viewer", "operator", "admin"].map((r) => el("option", { value: r, text: r })));

  const createDevice = guarded(async () => {
    const body = { device_id: newId.value.trim() };
    if (newName.value.trim()) body.name = newName.value.trim();
    if (newOwner.value.trim()) body.owner = newOwner.value.trim();
    const made = await api("POST", "/api/devices", body);
    fill(tokenArea, tokenBox(made.device_id, made.token));
    newId.value = newName.value = newOwner.value = "";
    await loadDevices();
    refresh();
  });
  const createUser = guarded(async () => {
    await api("POST", "/api/users", { username: userName.value.trim(), password: userPassword.value, role: userRole.value });
    notice(`user ${userName.value.trim()} created`);
    userName.value = userPassword.value = "";
    loadUsers();
  });
  async function loadUsers() {
    const data = await api("GET", "/api/users").catch(() => ({ users: [] }));
    fill(userRows, ...data.users.map((u) =>
      el("tr", {}, el("td", { text: u.username }), el("td", { text: u.role }), el("td", { text: fmtTime(u.created_at) }))));
  }

  const root = el(
    "section",
    {},
    el("h1", { text: "Admin" }),
    el("div", { class: "card" },
      el("h2", { text: "Create a device" }),
      el("form", { class: "row", id: "create-device", onsubmit: createDevice },
        el("label", {}, "device id", newId), el("label", {}, "name", newName),
        el("label", {}, "owner (username)", newOwner),
        el("button", { type: "submit", text: "Create" })),
      tokenArea),
    el("div", { class: "card table-wrap" },
      el("h2", { text: "Devices" }),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "Device" }), el("th", { text: "Owner" }), el("th", { text: "" }))), deviceRows)),
    el("div", { class: "card table-wrap" },
      el("h2", { text: "Users" }),
      el("form", { class: "row", id: "create-user", onsubmit: createUser },
        el("label", {}, "username", userName), el("label", {}, "password", userPassword),
        el("label", {}, "role", userRole), el("button", { type: "submit", text: "Create user" })),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "User" }), el("th", { text: "Role" }), el("th", { text: "Created" }))), userRows)),
  );

  let shownIds = "";
  function refresh() {
    const all = [...state.devices.values()].sort((a, b) => a.device_id.localeCompare(b.device_id));
    const ids = all.map((d) => `${d.device_id}:${d.owner}`).join(",");
    if (ids === shownIds) return; // buttons keep their focus while live updates arrive
    shownIds = ids;
    fill(deviceRows, ...all.map((d) => {
      const rotate = guarded(async () => {
        if (!confirm(`Rotate the token of ${d.device_id}? Its live connection is closed.`)) return;
        const made = await api("POST", `/api/devices/${encodeURIComponent(d.device_id)}/token`);
        fill(tokenArea, tokenBox(made.device_id, made.token));
      });
      const remove = guarded(async () => {
        if (!confirm(`Delete ${d.device_id}? This cannot be undone.`)) return;
        await api("DELETE", `/api/devices/${encodeURIComponent(d.device_id)}`);
        state.devices.delete(d.device_id);
        notice(`${d.device_id} deleted`);
        refresh();
      });
      return el("tr", { "data-device": d.device_id },
        el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.device_id)}`, text: d.device_id })),
        el("td", { text: d.owner || "—" }),
        el("td", {}, el("button", { type: "button", class: "plain", text: "Rotate token", onclick: rotate }), " ",
          el("button", { type: "button", class: "danger", text: "Delete", onclick: remove })));
    }));
  }
  loadUsers();
  return { root, refresh };
}

function loginView() {
  const username = el("input", { id: "username", name: "username", autocomplete: "username", required: true });
  const password = el("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const error = el("p", { class: "error", id: "login-error", role: "alert" });
  const submit = async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      await api("POST", "/api/auth/login", { username: username.value, password: password.value });
      state.me = await api("GET", "/api/auth/me");
      localStorage.setItem("ems_user", state.me.username);
      loggedIn();
      location.hash = state.after && state.after !== "#/login" ? state.after : "#/";
    } catch (err) {
      error.textContent = err.message.startsWith("401") ? "Wrong username or password." : err.message;
    }
  };
  const root = el("section", { class: "card login" },
    el("h1", { text: "Log in" }),
    el("form", { class: "stack", id: "login-form", onsubmit: submit },
      el("label", {}, "username", username), el("label", {}, "password", password),
      el("button", { type: "submit", text: "Log in" }), error));
  return { root };
}

function route() {
  if (current.view && current.view.destroy) current.view.destroy();
  const hash = location.hash || "#/";
  let view;
  if (!state.me) {
    if (hash !== "#/login") state.after = hash;
    view = loginView();
  } else if (hash.startsWith("#/device/")) {
    view = deviceView(decodeURIComponent(hash.slice("#/device/".length)));
  } else if (hash === "#/admin" && state.me.role === "admin") {
    view = adminView();
  } else {
    view = fleetView();
  }
  current.view = view;
  $("view").replaceChildren(view.root);
  if (view.refresh) view.refresh();
}

function loggedIn() {
  $("nav").hidden = false;
  $("nav-admin").hidden = state.me.role !== "admin";
  $("whoami").textContent = `${state.me.username} (${state.me.role})`;
  connect();
}

function loggedOut() {
  const wasIn = state.me !== null;
  state.me = null;
  localStorage.removeItem("ems_user");
  disconnect();
  state.devices.clear();
  state.series.clear();
  state.alerts.clear();
  state.commands.clear();
  $("nav").hidden = true;
  $("conn").hidden = true;
  if (wasIn || location.hash !== "#/login") {
    if (location.hash === "#/login") route();
    else location.hash = "#/login";
  }
}

async function start() {
  $("logout").addEventListener("click", guarded(async () => {
    await fetch("/api/auth/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
    loggedOut();
  }));
  $("lagged-dismiss").addEventListener("click", () => { $("lagged").hidden = true; });
  window.addEventListener("hashchange", () => {
    if (state.me && location.hash === "#/login") location.hash = "#/";
    else route();
  });
  // The cookie is HttpOnly: remember (not the token, only that we logged in) to skip a 401.
  if (localStorage.getItem("ems_user")) {
    try {
      const response = await fetch("/api/auth/me", { credentials: "same-origin" });
      if (response.ok) state.me = await response.json();
    } catch {
      /* hub unreachable: show the login page */
    }
  }
  if (state.me) {
    loggedIn();
    if (location.hash === "#/login") location.hash = "#/";
    route();
  } else {
    localStorage.removeItem("ems_user");
    if (location.hash !== "#/login") location.hash = "#/login";
    else route();
  }
}

document.addEventListener("DOMContentLoaded", start);
