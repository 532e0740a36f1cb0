// kwollect's web view: the /rpc API plotted with plotly.js. Read-only: it calls
// available_metrics, job_window, get_metrics and get_job_metrics, with the visitor's token
// if given.
"use strict";

const $ = (id) => document.getElementById(id);
const LIVE_MS = 5000;
// As the Grafana dashboard: 5-minute summaries from 30 minutes on, the 1-hour rollup over
// 7 days (2,016 five-minute points per series, about a chart's width in pixels: docs/storage.md).
const SUMMARY_FROM_S = 1800;
const ROLLUP_OVER_S = 7 * 86400;
const LEVEL_NAMES = { "5min": "5-minute summaries", "1h": "1-hour rollups" };
let liveTimer = null;
let lastQuery = null;

function headers(accept) {
  const h = { Accept: accept };
  const token = $("token").value.trim();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function call(fn, params, accept = "application/json") {
  const url = "../rpc/" + fn + "?" + new URLSearchParams(params).toString();
  const response = await fetch(url, { headers: headers(accept) });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      message = body.message + (body.hint ? " (" + body.hint + ")" : "");
    } catch (e) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function selection() {
  const job = $("job").value.trim();
  const devices = $("devices").value.split(",").map((d) => d.trim()).filter(Boolean);
  const metrics = Array.from($("metrics").selectedOptions).map((o) => o.value);
  return { job, devices, metrics, range: $("range").value };
}

async function loadMetricChoices(preselect) {
  const sel = selection();
  const params = {};
  if (sel.job) params.job_id = sel.job;
  if (sel.devices.length) params.devices = sel.devices;
  const query = { params: JSON.stringify(params) };
  if (sel.range !== "job") {
    const at = new Date(Date.now());
    query.at = at.toISOString();
  }
  let rows = [];
  try {
    rows = await (await call("available_metrics", query)).json();
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  const keep = new Set(preselect || selection().metrics);
  const names = Array.from(new Set(rows.map((r) => r.metric_id))).sort();
  for (const m of keep) if (!names.includes(m)) names.push(m);
  const box = $("metrics");
  box.replaceChildren(...names.map((m) => {
    const o = document.createElement("option");
    o.value = m; o.textContent = m; o.selected = keep.has(m);
    return o;
  }));
}

// The summary level for a window of `seconds`: null (raw samples), "5min" or "1h".
function summaryLevel(seconds) {
  if (seconds > ROLLUP_OVER_S) return "1h";
  if (seconds >= SUMMARY_FROM_S) return "5min";
  return null;
}

// The job's window in seconds, as get_metrics reads it (to now while the job runs): a
// job of days would otherwise be read as raw rows and refused (413).
async function jobSeconds(job) {
  const [win] = await (await call("job_window", { job_id: job })).json();
  return (Date.parse(win.end_time) - Date.parse(win.start_time)) / 1000;
}

async function requestParams(sel) {
  const p = { as_rate: "auto" };
  if (sel.job) p.job_id = sel.job;
  if (sel.devices.length) p.devices = sel.devices.join(",");
  if (sel.metrics.length) p.metrics = sel.metrics.join(",");
  let level;
  if (sel.range !== "job") {
    const now = Date.now() / 1000;
    p.start_time = String(Math.floor(now - Number(sel.range)));
    p.end_time = String(Math.ceil(now));
    level = summaryLevel(Number(sel.range));
  } else if (!sel.job) {
    throw new Error("'job window' needs a job id");
  } else {
    level = summaryLevel(await jobSeconds(sel.job));
  }
  if (level) p.summary = level;
  return p;
}

function seriesName(row) {
  const labels = Object.assign({}, row.labels);
  delete labels._metric_scrape_time;
  delete labels._device_orig;
  const keys = Object.keys(labels).sort();
  return keys.length ? row.device_id + " " + keys.map((k) => k + "=" + labels[k]).join(",")
                     : row.device_id;
}

function draw(rows) {
  const byMetric = new Map();
  for (const row of rows) {
    if (!byMetric.has(row.metric_id)) byMetric.set(row.metric_id, new Map());
    const series = byMetric.get(row.metric_id);
    const name = seriesName(row);
    if (!series.has(name)) series.set(name, { x: [], y: [] });
    const s = series.get(name);
    s.x.push(row.timestamp);
    s.y.push(typeof row.value === "number" ? row.value : null);   // "NaN" strings: gaps
  }
  const charts = $("charts");
  const wanted = new Set(byMetric.keys());
  for (const div of Array.from(charts.children)) {
    if (!wanted.has(div.dataset.metric)) { Plotly.purge(div); div.remove(); }
  }
  for (const metric of Array.from(byMetric.keys()).sort()) {
    let div = Array.from(charts.children).find((d) => d.dataset.metric === metric);
    if (!div) {
      div = document.createElement("div");
      div.className = "chart";
      div.dataset.metric = metric;
      charts.appendChild(div);
    }
    const traces = Array.from(byMetric.get(metric).entries()).sort()
      .map(([name, s]) => ({ type: "scatter",
                             mode: "lines", name, x: s.x, y: s.y }));
    Plotly.react(div, traces, {
      title: { text: metric }, margin: { t: 40, r: 20, b: 40, l: 60 },
      xaxis: { type: "date" }, legend: { orientation: "h" }, uirevision: metric,
    }, { responsive: true, displaylogo: false });
  }
  return byMetric;
}

// The job's energy, or why it is missing, beside a chart that is drawn anyway.
// get_job_metrics reads a long job's 5-minute summaries (method "summary"): said here.
async function showEnergy(job) {
  const section = $("energy");
  if (!job) { section.hidden = true; return; }
  let result;
  try {
    result = await (await call("get_job_metrics", { job_id: job })).json();
    $("energy-error").hidden = true;
  } catch (e) {
    result = {};
    $("energy-error").textContent = e.message;
    $("energy-error").hidden = false;
  }
  const perNode = result.node_energy_watthour || {};
  const body = section.querySelector("tbody");
  body.replaceChildren(...Object.keys(perNode).sort().map((node) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th"); th.textContent = node;
    const td = document.createElement("td");
    td.textContent = perNode[node] === null ? "–" : Number(perNode[node]).toFixed(2);
    tr.append(th, td);
    return tr;
  }));
  $("energy-method").hidden = result.method !== "summary";
  const total = result.job_energy_watthour;
  $("energy-total").textContent = total === null || total === undefined ? "–" : Number(total).toFixed(2);
  section.hidden = false;
}

function download(kind) {
  return async (event) => {
    event.preventDefault();
    if (!lastQuery) return;
    try {
      const accept = kind === "csv" ? "text/csv" : "application/json";
      const blob = await (await call("get_metrics", lastQuery, accept)).blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = "kwollect-metrics." + kind;
      document.body.appendChild(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    } catch (e) { setStatus(e.message, true); }
  };
}

async function refresh() {
  const sel = selection();
  if (!sel.job && !sel.devices.length) { setStatus("Pick a job, or devices, then Show."); return; }
  let params;
  try { params = await requestParams(sel); } catch (e) { setStatus(e.message, true); return; }
  lastQuery = params;
  history.replaceState(null, "", "?" + new URLSearchParams(
    Object.fromEntries(Object.entries({ job: sel.job, devices: sel.devices.join(","),
      metrics: sel.metrics.join(","), range: sel.range }).filter(([, v]) => v))).toString());
  try {
    const rows = await (await call("get_metrics", params)).json();
    const drawn = draw(rows);
    let series = 0;
    for (const s of drawn.values()) series += s.size;
    setStatus(rows.length + " rows, " + series + " series, " + drawn.size + " metrics"
              + (params.summary ? " (" + LEVEL_NAMES[params.summary] + ")" : "")
              + ($("live").checked ? " · live" : ""));
    $("downloads").hidden = false;
    await showEnergy(sel.job);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function schedule() {
  if (liveTimer) clearInterval(liveTimer);
  liveTimer = $("live").checked ? setInterval(refresh, LIVE_MS) : null;
}

document.addEventListener("DOMContentLoaded", async () => {
  const q = new URLSearchParams(location.search);
  if (q.get("job")) $("job").value = q.get("job");
  if (q.get("devices")) $("devices").value = q.get("devices");
  if (q.get("range")) $("range").value = q.get("range");
  if (q.get("live") === "0") $("live").checked = false;
  const preselect = (q.get("metrics") || "").split(",").filter(Boolean);
  $("csv").addEventListener("click", download("csv"));
  $("json").addEventListener("click", download("json"));
  $("job").addEventListener("change", () => loadMetricChoices());
  $("devices").addEventListener("change", () => loadMetricChoices());
  $("live").addEventListener("change", schedule);
  $("query").addEventListener("submit", (event) => { event.preventDefault(); refresh(); schedule(); });
  await loadMetricChoices(preselect);
  if (q.get("job") || q.get("devices")) { await refresh(); schedule(); }
});
