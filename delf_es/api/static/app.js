// The delf-es page: plain JS against the /v1 API (no framework, no build step, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, url: null, natural: null, crop: null, result: null };

// ---- token and requests ---------------------------------------------------------------
$("token").value = sessionStorage.getItem("delf-es-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("delf-es-token", $("token").value); loadStats(); });

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const reason = body && body.error ? `${body.error.type}: ${body.error.reason}` : response.statusText;
    throw new Error(`${response.status} ${reason}`);
  }
  return body;
}

const thumbnails = new Map();  // id -> object URL (an <img src> cannot carry the bearer token)
async function thumbnailUrl(id) {
  if (!thumbnails.has(id)) {
    thumbnails.set(id, (async () => {
      const response = await fetch(`/v1/images/${encodePath(id)}/thumbnail`, { headers: authHeaders() });
      if (!response.ok) return null;
      return URL.createObjectURL(await response.blob());
    })());
  }
  return thumbnails.get(id);
}

function encodePath(id) { return id.split("/").map(encodeURIComponent).join("/"); }

async function loadStats() {
  try {
    const s = await api("/v1/stats");
    $("stats").textContent = `${s.images} images · ${s.backend} · ${s.model_id}` +
      (s.thumbnail_bytes_per_image ? ` · ${Math.round(s.thumbnail_bytes_per_image / 1024 * 10) / 10} KB thumbnail/image` : "");
  } catch (error) {
    $("stats").textContent = String(error.message);
  }
}

// ---- tabs -----------------------------------------------------------------------------
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== tab.dataset.view; });
}));

// ---- query: drop / pick, crop box -----------------------------------------------------
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) setQuery(e.dataTransfer.files[0]);
});
$("query-file").addEventListener("change", (e) => { if (e.target.files.length) setQuery(e.target.files[0]); });

function setQuery(file) {
  if (state.url) URL.revokeObjectURL(state.url);
  state.file = file; state.url = URL.createObjectURL(file); state.crop = null;
  const img = $("query-img");
  img.onload = () => { state.natural = { w: img.naturalWidth, h: img.naturalHeight }; drawCrop(); };
  img.src = state.url;
  $("query-box").hidden = false;
  $("search").disabled = false;
}

let dragStart = null;
const box = $("query-box");
function imagePoint(e) {  // mouse position in the ORIGINAL image's pixels
  const rect = $("query-img").getBoundingClientRect();
  const sx = state.natural.w / rect.width, sy = state.natural.h / rect.height;
  const x = Math.min(Math.max(e.clientX - rect.left, 0), rect.width) * sx;
  const y = Math.min(Math.max(e.clientY - rect.top, 0), rect.height) * sy;
  return { x, y };
}
box.addEventListener("mousedown", (e) => { if (state.natural) { e.preventDefault(); dragStart = imagePoint(e); } });
window.addEventListener("mousemove", (e) => {
  if (!dragStart) return;
  const p = imagePoint(e);
  state.crop = [Math.min(dragStart.x, p.x), Math.min(dragStart.y, p.y), Math.max(dragStart.x, p.x), Math.max(dragStart.y, p.y)];
  drawCrop();
});
window.addEventListener("mouseup", () => {
  if (dragStart && state.crop && (state.crop[2] - state.crop[0] < 8 || state.crop[3] - state.crop[1] < 8)) state.crop = null;
  dragStart = null; drawCrop();
});
$("clear-crop").addEventListener("click", () => { state.crop = null; drawCrop(); });

function drawCrop() {
  const crop = $("crop");
  if (!state.crop || !state.natural) { crop.hidden = true; $("crop-label").textContent = ""; return; }
  const img = $("query-img");
  const s = img.clientWidth / state.natural.w;
  const [x1, y1, x2, y2] = state.crop;
  Object.assign(crop.style, { left: `${x1 * s}px`, top: `${y1 * s}px`, width: `${(x2 - x1) * s}px`, height: `${(y2 - y1) * s}px` });
  crop.hidden = false;
  $("crop-label").textContent = `region ${state.crop.map(Math.round).join(",")}`;
}

// ---- search and hits ------------------------------------------------------------------
$("search").addEventListener("click", search);

async function search() {
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("matches", "true");
  form.append("limit", $("limit").value || "12");
  if (state.crop) form.append("bbox", state.crop.map((v) => v.toFixed(1)).join(","));
  if ($("filter").value.trim()) form.append("filter", $("filter").value.trim());
  const status = $("search-status");
  status.className = "status"; status.textContent = "searching…";
  $("hits").innerHTML = ""; closeMatch();
  try {
    const result = await api("/v1/search", { method: "POST", body: form });
    state.result = result;
    state.searchedCrop = state.crop ? [...state.crop] : null;
    status.textContent = `${result.hits.length} hits in ${Math.round(result.took_ms)} ms · query ${result.query.width}×${result.query.height}, ${result.query.keypoints} keypoints`;
    renderHits(result.hits);
  } catch (error) {
    status.className = "status error"; status.textContent = error.message;
  }
}

function renderHits(hits) {
  const grid = $("hits");
  grid.innerHTML = "";
  hits.forEach((hit, rank) => {
    const card = document.createElement("div");
    card.className = "hit"; card.dataset.id = hit.id;
    const img = document.createElement("img"); img.alt = hit.id;
    thumbnailUrl(hit.id).then((url) => { if (url) img.src = url; });
    const id = document.createElement("div"); id.className = "id"; id.textContent = `${rank + 1}. ${hit.id}`; id.title = hit.id;
    const nums = document.createElement("div"); nums.className = "nums";
    nums.textContent = `score ${hit.score.toFixed(1)} · ${hit.inliers} inliers`;
    card.append(img, id, nums);
    card.addEventListener("click", () => openMatch(hit));
    grid.append(card);
  });
}

// ---- match view: query and hit side by side, verified pairs as lines ---------------------
$("close-match").addEventListener("click", closeMatch);
function closeMatch() { $("match").hidden = true; $("hits").hidden = false; }

async function openMatch(hit) {
  const record = await api(`/v1/images/${encodePath(hit.id)}`);
  $("match-title").textContent = `${hit.id} · ${hit.inliers} verified correspondences · score ${hit.score.toFixed(1)}`;
  $("hits").hidden = true; $("match").hidden = false;
  const qImg = $("match-query"), hImg = $("match-hit");
  const loaded = (img) => new Promise((resolve) => { if (img.complete && img.naturalWidth) resolve(); else img.onload = () => resolve(); });
  qImg.src = state.url;
  hImg.src = (await thumbnailUrl(hit.id)) || "";
  await Promise.all([loaded(qImg), loaded(hImg)]);
  state.lastHit = [hit, record];
  layoutMatch();
  drawLines(hit, record);
}

function layoutMatch() {  // both images the same height, side by side, within the stage
  const stage = $("match-stage");
  const half = (stage.clientWidth - 16 - 24) / 2, tall = Math.min(560, window.innerHeight * 0.7);
  for (const img of [$("match-query"), $("match-hit")]) {
    const ratio = img.naturalWidth / img.naturalHeight;
    const height = Math.min(tall, half / ratio);
    img.style.height = `${height}px`; img.style.width = `${height * ratio}px`;
  }
}

function drawLines(hit, record) {
  const svg = $("match-lines");
  svg.innerHTML = "";
  const stage = $("match-stage").getBoundingClientRect();
  const q = $("match-query").getBoundingClientRect(), h = $("match-hit").getBoundingClientRect();
  const sq = q.width / state.result.query.width, sh = h.width / record.width;  // original px -> screen px
  const ns = "http://www.w3.org/2000/svg";
  if (state.searchedCrop) {  // the region the search used, on the query
    const [x1, y1, x2, y2] = state.searchedCrop;
    const rect = document.createElementNS(ns, "rect");
    Object.entries({ x: q.left - stage.left + x1 * sq, y: q.top - stage.top + y1 * sq, width: (x2 - x1) * sq,
                     height: (y2 - y1) * sq }).forEach(([k, v]) => rect.setAttribute(k, v));
    svg.append(rect);
  }
  (hit.matches || []).forEach(([qx, qy, x, y], i) => {
    const color = `hsl(${(i * 47) % 360} 85% 45%)`;
    const x1 = q.left - stage.left + qx * sq, y1 = q.top - stage.top + qy * sq;
    const x2 = h.left - stage.left + x * sh, y2 = h.top - stage.top + y * sh;
    const line = document.createElementNS(ns, "line");
    Object.entries({ x1, y1, x2, y2, stroke: color }).forEach(([k, v]) => line.setAttribute(k, v));
    svg.append(line);
    for (const [cx, cy] of [[x1, y1], [x2, y2]]) {
      const dot = document.createElementNS(ns, "circle");
      Object.entries({ cx, cy, r: 3, stroke: color }).forEach(([k, v]) => dot.setAttribute(k, v));
      svg.append(dot);
    }
  });
}
window.addEventListener("resize", () => { /* lines follow the layout */
  if (!$("match").hidden && state.lastHit) { layoutMatch(); drawLines(...state.lastHit); }
});

// ---- add images: one PUT per file, with upload progress -----------------------------------
$("add-files").addEventListener("change", async (e) => {
  const files = Array.from(e.target.files);
  const rows = $("add-results");
  rows.innerHTML = "";
  const bar = $("add-progress");
  bar.max = files.length; bar.value = 0;
  let metadata = null;
  if ($("add-metadata").value.trim()) metadata = $("add-metadata").value.trim();
  for (const [n, file] of files.entries()) {
    $("add-count").textContent = `${n} / ${files.length}`;
    const row = rows.insertRow();
    row.insertCell().textContent = file.name;
    const [result, keypoints, error] = [row.insertCell(), row.insertCell(), row.insertCell()];
    result.textContent = "uploading…";
    try {
      const body = await upload(file, metadata, (fraction) => { bar.value = n + fraction * 0.5; });
      result.textContent = body.result; keypoints.textContent = body.keypoints;
    } catch (err) {
      result.textContent = "failed"; error.textContent = err.message; error.className = "error";
    }
    bar.value = n + 1;
  }
  $("add-count").textContent = `${files.length} / ${files.length} done`;
  e.target.value = "";
  loadStats();
});

function upload(file, metadata, onProgress) {  // XMLHttpRequest: fetch() reports no upload progress
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("PUT", `/v1/images/${encodePath(file.name)}?refresh=true`);
    Object.entries(authHeaders()).forEach(([k, v]) => request.setRequestHeader(k, v));
    request.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    request.onload = () => {
      let body = null;
      try { body = JSON.parse(request.responseText); } catch (_) { /* not JSON */ }
      if (request.status < 300) resolve(body);
      else reject(new Error(body && body.error ? `${request.status} ${body.error.type}: ${body.error.reason}` : `${request.status}`));
    };
    request.onerror = () => reject(new Error("network error"));
    const form = new FormData();
    form.append("file", file, file.name);
    if (metadata) form.append("metadata", metadata);
    request.send(form);
  });
}

loadStats();
