// simsearch inspection dashboard: plain JS over the /v1 API (no build step, no network beyond this server).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { index: null, token: sessionStorage.getItem("simsearch-token") || "" };
const GALLERY_SIZE = 12;

// -- API access: JSON errors become exceptions with the server's message ------------------------
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) $("token-form").hidden = false;
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// Images go through fetch too, so that a token (when reads need one) is sent with them.
async function imageUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? (Number.isInteger(value) ? String(value) : value.toFixed(digits)) : String(value);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// -- index choice and overview -------------------------------------------------------------------
async function loadIndexes() {
  const { indexes } = await (await api("/v1/indexes")).json();
  const select = $("index-select");
  select.replaceChildren(...indexes.map((ix) => new Option(ix.name + (ix.ready ? "" : " (not built)"), ix.name)));
  const remembered = localStorage.getItem("simsearch-index");
  if (indexes.some((ix) => ix.name === remembered)) select.value = remembered;
  state.index = select.value || null;
  if (!state.index) showError("This server serves no index yet.");
}

async function loadOverview() {
  if (!state.index) return;
  const list = $("overview-list");
  try {
    const info = await (await api(`/v1/indexes/${encodeURIComponent(state.index)}`)).json();
    const cal = info.calibration;
    const rows = [
      ["reference images", info.reference_images],
      ["held-out images", info.calibration_images],
      ["patch vectors", info.bank_vectors],
      ["bank", `${info.bank_kind}, generation ${info.generation}`],
      ["backbone", info.config.backbone],
      ["image threshold", cal ? fmt(cal.image_threshold) : "not calibrated"],
      ["pixel threshold", cal ? fmt(cal.pixel_threshold) : "–"],
      ["min region", cal ? `${cal.min_region_area} px` : "–"],
      ["false alarms", cal ? `≤ ${fmt(cal.expected_false_alarms_per_100_good, 1)} per 100 good parts` : "–"],
      ["target", cal ? `${fmt(cal.target_false_alarms_per_100_good, 1)} per 100 (on ${cal.n_good} good images)` : "–"],
      ["calibration", cal ? (info.calibration_fresh ? `#${cal.id}, fresh`
        : info.verdicts ? `#${cal.id}, predates adds` : `#${cal.id}, STALE`) : "none"],
      ["drift", driftText(info.drift)],
    ];
    list.replaceChildren(...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      return [dt, dd];
    }));
    $("overview-note").textContent = info.warning ||
      "A good part is flagged with at most the false-alarm rate above: the threshold is an order statistic " +
      "of scores of good images kept out of the bank.";
  } catch (err) {
    list.replaceChildren();
    $("overview-note").textContent = err.message;
  }
}

function driftText(drift) {
  // Recent queries above the calibration's 5% line, against the share good parts reach (simsearch/drift.py).
  if (!drift) return "–";
  if (drift.p_value === null) return `${drift.queries} recent queries (too few to test)`;
  const share = `${fmt(100 * drift.share, 1)}% of the last ${drift.queries} above the 5% line ` +
    `(good parts: ${fmt(100 * drift.expected_share, 1)}%)`;
  return drift.drifting ? `DRIFTING: ${share}, p = ${drift.p_value.toExponential(1)}` : share;
}

// -- one result ------------------------------------------------------------------------------------
function showVerdict(record) {
  const verdict = $("verdict");
  const kind = record.comparable === false ? "foreign"
    : record.is_anomalous === null ? "none" : record.is_anomalous ? "anomalous" : "ok";
  verdict.className = "verdict " + kind;
  verdict.textContent = { none: "NO VERDICT", foreign: "FOREIGN IMAGE", anomalous: "ANOMALOUS", ok: "OK" }[kind];
  const t = record.threshold;
  $("score-text").textContent = t === null
    ? `score ${fmt(record.score)} (no fresh calibration, no threshold)`
    : `score ${fmt(record.score)} against threshold ${fmt(t)} · similarity ${fmt(record.similarity, 3)}`;
  const top = Math.max(t === null ? record.score : 2 * t, record.score * 1.1, 1e-9);
  $("score-fill").style.width = `${Math.min(100, (100 * record.score) / top)}%`;
  $("score-fill").style.background = kind === "anomalous" ? "var(--bad)" : kind === "ok" ? "var(--good)" : "var(--none)";
  $("threshold-mark").hidden = t === null;
  if (t !== null) $("threshold-mark").style.left = `${(100 * t) / top}%`;
  $("warning").textContent = record.warning || "";
  $("warning").hidden = !record.warning;
}

function cropCanvas(image, region, record) {
  // The query's side of a pair: the region's box, at least as large as the reference crop.
  const canvas = document.createElement("canvas");
  const w = Math.max(region.w, 2 * record.peak.w), h = Math.max(region.h, 2 * record.peak.h);
  const x = Math.max(0, Math.min(region.x + region.w / 2 - w / 2, record.width - w));
  const y = Math.max(0, Math.min(region.y + region.h / 2 - h / 2, record.height - h));
  canvas.width = w; canvas.height = h;
  canvas.getContext("2d").drawImage(image, x, y, w, h, 0, 0, w, h);
  canvas.title = `query region at (${region.x}, ${region.y}), ${region.w}×${region.h} px`;
  return canvas;
}

async function showRegions(record, original) {
  const list = $("regions");
  const regions = record.regions.length ? record.regions : [];
  if (!regions.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = record.threshold === null ? "No regions without a calibration." : "No region above the pixel threshold.";
    list.replaceChildren(li);
    return;
  }
  const items = await Promise.all(regions.map(async (region, i) => {
    const li = document.createElement("li");
    li.className = "region";
    const pair = document.createElement("div");
    pair.className = "pair";
    if (original) pair.append(cropCanvas(original, region, record));
    if (region.nearest) {
      const ref = document.createElement("img");
      ref.className = "reference";
      ref.alt = "nearest good patch";
      ref.title = `reference ${region.nearest.sha256.slice(0, 12)} at (${region.nearest.x}, ${region.nearest.y})`;
      ref.src = await imageUrl(region.nearest.thumbnail);
      pair.append(ref);
    }
    const text = document.createElement("div");
    text.textContent = `#${i + 1} score ${fmt(region.score, 2)} · ${region.area} px` +
      (region.nearest ? ` · ref distance ${fmt(region.nearest.distance, 2)}` : "");
    li.append(pair, text);
    return li;
  }));
  list.replaceChildren(...items);
}

async function showRecord(record, originalUrl, heatmapUrl) {
  $("result").hidden = false;
  showVerdict(record);
  $("image-name").textContent = record.image;
  $("original").src = originalUrl || "";
  $("original").closest("figure").hidden = !originalUrl;
  $("heatmap").src = heatmapUrl;
  let original = null;
  if (originalUrl) {
    original = $("original");
    if (!original.complete) await new Promise((ok) => { original.onload = ok; original.onerror = ok; });
  }
  await showRegions(record, original);
}

// -- querying ----------------------------------------------------------------------------------------
async function inspect(files) {
  if (!state.index || !files.length) return;
  showError("");
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  $("drop-zone").classList.add("busy");
  try {
    const url = `/v1/indexes/${encodeURIComponent(state.index)}/query?heatmap=url`;
    const { results } = await (await api(url, { method: "POST", body: form })).json();
    const last = results.length - 1;  // several files: all land in the gallery, the last one is shown
    await showRecord(results[last], URL.createObjectURL(files[last]), await imageUrl(results[last].heatmap));
    await loadGallery();
  } catch (err) {
    showError(err.message);
  } finally {
    $("drop-zone").classList.remove("busy");
  }
}

async function loadGallery() {
  if (!state.index) return;
  const gallery = $("gallery");
  try {
    const { queries } = await (await api(
      `/v1/indexes/${encodeURIComponent(state.index)}/queries?limit=${GALLERY_SIZE}`)).json();
    if (!queries.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No queries yet.";
      gallery.replaceChildren(p);
      return;
    }
    const figures = await Promise.all(queries.map(async (q) => {
      const r = q.record;
      const figure = document.createElement("figure");
      figure.className = r.is_anomalous === null ? "none" : r.is_anomalous ? "anomalous" : "ok";
      const img = document.createElement("img");
      img.alt = r.image;
      img.src = await imageUrl(q.preview);
      const caption = document.createElement("figcaption");
      caption.textContent = `${r.is_anomalous === null ? "–" : r.is_anomalous ? "ANOMALOUS" : "ok"} ${fmt(r.score, 2)} · ${r.image}`;
      figure.append(img, caption);
      figure.addEventListener("click", async () => {
        const heat = r.heatmap ? await imageUrl(r.heatmap).catch(() => img.src) : img.src;
        await showRecord(r, null, heat);
      });
      return figure;
    }));
    gallery.replaceChildren(...figures);
  } catch (err) {
    gallery.textContent = err.message;
  }
}

// -- wiring --------------------------------------------------------------------------------------------
function wire() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";  // picking the same file again is a new query
    inspect(files);
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    inspect([...e.dataTransfer.files]);
  });
  $("index-select").addEventListener("change", (e) => {
    state.index = e.target.value;
    localStorage.setItem("simsearch-index", state.index);
    $("result").hidden = true;
    refresh();
  });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("simsearch-token", state.token);
    $("token-form").hidden = true;
    start();
  });
}

async function refresh() {
  await Promise.all([loadOverview(), loadGallery()]);
}

async function start() {
  try {
    await loadIndexes();
    await refresh();
  } catch (err) {
    showError(err.message);
  }
}

wire();
start();
setInterval(refresh, 10000);  // queries from the line and changes by the CLI show up without a reload
