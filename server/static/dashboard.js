// Live dashboard: polls the JSON summary and draws small canvas charts (no external libraries).
"use strict";

const SUMMARY_URL = "/v1/dashboard/summary";
const REFRESH_MS = 2000;
const HISTORY = 90;
const COLORS = ["#2f6fde", "#e0613a", "#2aa876", "#9b59b6"];
const history = { throughput: [], ttft50: [], ttft99: [], itl50: [], itl99: [], running: [], waiting: [], kv: [] };

function push(series, value) {
  series.push(value === null || value === undefined ? NaN : value);
  if (series.length > HISTORY) series.shift();
}

function fmt(value, digits) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : value.toFixed(digits);
}

function drawChart(id, seriesList) {
  const canvas = document.getElementById(id);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const values = seriesList.flat().filter((v) => Number.isFinite(v));
  const top = Math.max(0, ...values);
  const max = (top > 0 ? top : 1) * 1.15;
  ctx.strokeStyle = "#d5d9e2";
  ctx.fillStyle = "#5a6275";
  ctx.font = "11px system-ui";
  for (let i = 0; i <= 4; i++) {
    const y = h - pad + ((pad * 2 - h) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 4, y); ctx.stroke();
    ctx.fillText(((max * i) / 4).toPrecision(2), 2, y - 2);
  }
  seriesList.forEach((series, index) => {
    ctx.strokeStyle = COLORS[index % COLORS.length];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    series.forEach((value, i) => {
      if (!Number.isFinite(value)) { started = false; return; }
      const x = pad + ((w - pad - 4) * i) / Math.max(1, HISTORY - 1);
      const y = h - pad - ((h - pad * 2) * value) / max;
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    });
    ctx.stroke();
  });
  canvas.dataset.points = String(values.length);
}

function heatColor(fraction) {
  const light = 95 - Math.round(55 * fraction);
  return `hsl(215, 70%, ${light}%)`;
}

function renderTables(summary) {
  const adapters = document.querySelector("#adapters tbody");
  const names = new Set([...Object.keys(summary.adapters), ...Object.keys(summary.tiers)]);
  adapters.innerHTML = "";
  [...names].sort().forEach((name) => {
    const row = summary.adapters[name] || { requests: 0, tokens: 0 };
    const tr = document.createElement("tr");
    [name, summary.tiers[name] || (name === summary.model ? "base" : "–"), row.requests, row.tokens].forEach((v) => {
      const td = document.createElement("td"); td.textContent = String(v); tr.appendChild(td);
    });
    adapters.appendChild(tr);
  });
  const routing = document.querySelector("#routing tbody");
  routing.innerHTML = "";
  Object.entries(summary.routing).sort().forEach(([name, counts]) => {
    const total = counts.reduce((a, b) => a + b, 0) || 1;
    const tr = document.createElement("tr");
    const label = document.createElement("td"); label.textContent = name; tr.appendChild(label);
    const cells = document.createElement("td");
    counts.forEach((count, expert) => {
      const span = document.createElement("span");
      span.className = "heat";
      span.title = `expert ${expert}: ${count} tokens`;
      span.style.background = heatColor(count / total);
      span.textContent = `${Math.round((100 * count) / total)}%`;
      cells.appendChild(span);
    });
    tr.appendChild(cells);
    routing.appendChild(tr);
  });
}

// Per adapter: a grid of experts (rows) by adapted layers (columns), each cell the expert's share of the layer.
function renderLayerRouting(byLayer) {
  const holder = document.getElementById("routing-layers");
  holder.innerHTML = "";
  Object.entries(byLayer || {}).sort().forEach(([name, layers]) => {
    const paths = Object.keys(layers).sort();
    if (paths.length === 0) return;
    const experts = Math.max(...paths.map((p) => layers[p].length));
    const title = document.createElement("div");
    title.textContent = name;
    const grid = document.createElement("div");
    grid.className = "layer-grid";
    grid.id = `layer-routing-${name}`;
    grid.style.gridTemplateColumns = `repeat(${paths.length}, 6px)`;
    for (let expert = 0; expert < experts; expert++) {
      paths.forEach((path) => {
        const counts = layers[path];
        const total = counts.reduce((a, b) => a + b, 0) || 1;
        const share = (counts[expert] || 0) / total;
        const cell = document.createElement("span");
        cell.style.background = heatColor(share);
        cell.title = `${path}, expert ${expert}: ${Math.round(100 * share)}%`;
        grid.appendChild(cell);
      });
    }
    holder.appendChild(title);
    holder.appendChild(grid);
  });
}

function mib(bytes) {
  return bytes === null || bytes === undefined ? "–" : (bytes / 1048576).toFixed(1);
}

// Bytes held by adapters: in slots (read in place on a CPU) and in host memory outside slots, with budgets.
function renderAdapterMemory(memory) {
  document.getElementById("adapter-memory").textContent = `${mib(memory.device)} / ${mib(memory.cpu)}`;
  document.getElementById("adapter-memory-unit").textContent =
    `MiB in slots / in host memory (budgets ${mib(memory.device_budget)} / ${mib(memory.cpu_budget)})`;
}

function render(summary) {
  document.getElementById("model").textContent = summary.model || "no model";
  document.getElementById("throughput").textContent = fmt(summary.throughput_tokens_per_second, 1);
  document.getElementById("ttft").textContent = `${fmt(summary.ttft_p50, 3)} / ${fmt(summary.ttft_p99, 3)}`;
  document.getElementById("itl").textContent = `${fmt(summary.itl_p50, 3)} / ${fmt(summary.itl_p99, 3)}`;
  document.getElementById("queues").textContent = `${summary.running} / ${summary.waiting}`;
  document.getElementById("kv").textContent = `${summary.kv_blocks_used} / ${summary.kv_blocks_total}`;
  document.getElementById("preemptions").textContent = String(summary.preemptions);
  renderAdapterMemory(summary.adapter_memory || {});
  push(history.throughput, summary.throughput_tokens_per_second);
  push(history.ttft50, summary.ttft_p50); push(history.ttft99, summary.ttft_p99);
  push(history.itl50, summary.itl_p50); push(history.itl99, summary.itl_p99);
  push(history.running, summary.running); push(history.waiting, summary.waiting);
  push(history.kv, summary.kv_blocks_total ? (100 * summary.kv_blocks_used) / summary.kv_blocks_total : 0);
  drawChart("chart-throughput", [history.throughput]);
  drawChart("chart-latency", [history.ttft50, history.ttft99, history.itl50, history.itl99]);
  drawChart("chart-queues", [history.running, history.waiting]);
  drawChart("chart-kv", [history.kv]);
  renderTables(summary);
  renderLayerRouting(summary.routing_by_layer);
  document.getElementById("status").textContent = `updated ${new Date(summary.time * 1000).toLocaleTimeString()}`;
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

// With API keys set (and no --public-metrics) the summary needs a key: asked once, kept for this tab only.
// A link may carry it as /dashboard#key=KEY (a fragment never reaches the server or its logs).
const KEY_STORE = "malora-dashboard-key";
let askedForKey = false;
if (location.hash.startsWith("#key=")) {
  sessionStorage.setItem(KEY_STORE, decodeURIComponent(location.hash.slice(5)));
  window.history.replaceState(null, "", location.pathname);  // `history` here is the charts' series
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function refresh() {
  try {
    const response = await fetch(SUMMARY_URL, { cache: "no-store", headers: authHeaders() });
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      if (!askedForKey) {
        askedForKey = true;
        const key = window.prompt("This server needs an API key for its metrics:");
        if (key) sessionStorage.setItem(KEY_STORE, key.trim());
      }
      throw new Error("an API key is needed (reload the page to enter it)");
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (error) {
    document.getElementById("status").textContent = `no data: ${error.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
