// The web page: send the chosen files to /predict (one) or /predict/batch (several) with
// ?explain=true, and draw each image, its heatmap, label, probability and input-guard result.
// Plain JavaScript, no build step; every URL is relative so the page works behind a proxy.
// Text from files and responses is only ever set as textContent, never parsed as HTML.
"use strict";

const TOWARD_PNEUMONIA = [220, 30, 30];
const TOWARD_NORMAL = [30, 90, 230];

const $ = (selector) => document.querySelector(selector);
const keyInput = $("#api-key");
const opacityInput = $("#opacity");
const statusLine = $("#status");
const results = $("#results");

// The newest choice of files: an answer to an older one that arrives later is dropped, never mixed in.
let latest = 0;
let inFlight = null;
// A classic-head model gives no heatmap (422 explain_unsupported): the page then asks for predictions alone.
let explainSupported = true;

// The API key lives in this input only: never stored, sent only to this service.
function headers(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

// fetch() refuses a header value outside ISO-8859-1 with a TypeError that reads like a network failure.
function keyProblem() {
  return /[^\x20-\x7e]/.test(keyInput.value.trim())
    ? "The API key holds characters an HTTP header cannot carry (printable ASCII only): check it was pasted whole."
    : null;
}

// The parsed JSON body, or null when there is none (a proxy's own page, a sign-in redirect, a cut-off answer).
async function readAnswer(response) {
  try {
    return await response.json();
  } catch (_) {
    return null;
  }
}

function errorText(response, body) {
  if (body && body.error) return `${body.error.message} (${body.error.code}, HTTP ${response.status})`;
  return `HTTP ${response.status} ${response.statusText}`;
}

async function send(files, batch, signal) {
  const form = new FormData();
  for (const file of files) form.append(batch ? "files" : "file", file, file.name);
  const path = batch ? "predict/batch" : "predict";
  const response = await fetch(explainSupported ? `${path}?explain=true` : path, {
    method: "POST",
    headers: headers(),
    body: form,
    signal,
  });
  return { response, body: await readAnswer(response) };
}

async function showModel() {
  const target = $("#model-identity");
  try {
    const response = await fetch("health", { headers: headers() });
    const health = await response.json();
    if (!health.model) {
      target.textContent = `not ready (${health.status}: ${health.detail || ""})`;
      return;
    }
    showIdentity(health.model);
  } catch (error) {
    target.textContent = `unreachable (${error})`;
  }
}

function showIdentity(model) {
  $("#model-identity").textContent = `${model.name} ${model.version} · sha256 ${model.sha256.slice(0, 12)}`;
}

// ``note`` is added to the status line (what a drop left out).
async function score(files, note = "") {
  const call = ++latest;
  if (inFlight) inFlight.abort(); // the older request's answer is no longer wanted
  const controller = new AbortController();
  inFlight = controller;
  results.replaceChildren();
  const problem = keyProblem();
  if (problem) {
    statusLine.textContent = problem;
    return;
  }
  const batch = files.length > 1;
  statusLine.textContent = `Scoring ${files.length} file${batch ? "s" : ""}…`;
  let response;
  let body;
  try {
    ({ response, body } = await send(files, batch, controller.signal));
    if (response.status === 422 && body && body.error && body.error.code === "explain_unsupported") {
      explainSupported = false;
      ({ response, body } = await send(files, batch, controller.signal));
    }
  } catch (error) {
    if (call === latest) statusLine.textContent = `The service could not be reached: ${error}`;
    return;
  }
  if (call !== latest) return;
  if (!response.ok) {
    const message = errorText(response, body);
    if (batch || response.status < 400 || response.status >= 500 || response.status === 401) {
      statusLine.textContent = `Request failed: ${message}${note}`;
      return;
    }
    // One file refused for itself (bad image, not a chest X-ray): show it on its card.
    statusLine.textContent = `The file was refused: ${message}${note}`;
    render(files[0], { filename: files[0].name, error: { message } });
    return;
  }
  if (!body || (batch && !Array.isArray(body.results))) {
    const why = response.redirected ? ", after a redirect: a proxy's sign-in page?" : "";
    statusLine.textContent = `The service's answer could not be read (HTTP ${response.status}${why}).${note}`;
    return;
  }
  const items = batch ? body.results : [{ ...body, filename: files[0].name }];
  statusLine.textContent = `${items.length} result${items.length > 1 ? "s" : ""}.${note}`;
  items.forEach((item, index) => render(files[index], item));
}

function render(file, item) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  // The file's own name: the service echoes a batch part's name as the browser encoded it (%22 for a quote).
  card.querySelector(".filename").textContent = file.name || item.filename || "(unnamed file)";
  results.append(card);
  if (item.error) {
    const error = item.error.code ? `${item.error.message} (${item.error.code})` : item.error.message;
    card.querySelector(".error").textContent = error;
    card.querySelector(".picture").remove();
    card.querySelector(".gauge").remove();
    return;
  }
  showIdentity(item.model);
  const label = card.querySelector(".label");
  label.textContent = item.label;
  label.classList.add(item.label);
  const p = item.pneumonia_probability;
  const side = p >= item.threshold ? "at or above" : "below";
  card.querySelector(".probability").textContent =
    `P(pneumonia) = ${p.toFixed(4)}, ${side} the threshold ${item.threshold.toFixed(4)} (calibrated)`;
  card.querySelector(".gauge .fill").style.width = `${(100 * p).toFixed(2)}%`;
  card.querySelector(".gauge .threshold").style.left = `${(100 * item.threshold).toFixed(2)}%`;
  showGuard(card.querySelector(".guard"), item.input_guard, item.warning);
  if (item.input_guard && !item.input_guard.passed) {
    // Flag mode answers an image the guard failed: its label must not read as a finding.
    label.classList.add("failed-guard");
    card.querySelector(".unreliable").textContent =
      "Unreliable: this image does not resemble the chest X-rays the model was trained on.";
  }
  const map = item.heatmap;
  if (map) {
    const scale = Math.max(...map.values.map(Math.abs));
    card.querySelector(".map-info").textContent =
      `${map.method} on ${map.layer}, ${map.grid[0]}x${map.grid[1]} cells, largest |value| ${scale.toFixed(3)} log-odds`;
  }
  drawPicture(card, file, map, item.source).catch((error) => {
    card.querySelector(".picture").remove();
    card.querySelector(".error").textContent = `The image could not be shown: ${error}`;
  });
}

function showGuard(target, guard, warning) {
  if (!guard) return; // a model or service without the input guard
  const verdict = guard.passed ? "passed" : "failed";
  target.textContent =
    `Input guard ${verdict}: score ${guard.score.toFixed(3)}, threshold ${guard.threshold.toFixed(3)}` +
    (guard.detail != null ? `; fine detail ${guard.detail.toFixed(3)}, floor ${guard.detail_floor.toFixed(3)}` : "") +
    (warning ? `. ${warning}` : "");
  if (!guard.passed) target.classList.add("failed");
}

// The browser decodes JPEG and PNG itself, and its picture is used when it is the one the service scored:
// the same size once upright. Otherwise the service draws the image as the model saw it (/explain with
// the heatmap at opacity 0): DICOM (also one whose preamble holds a PNG), 12-bit or lossless JPEG, and
// an orientation the browser reads differently (an eXIf chunk after the image data, a raw EXIF profile).
async function decodeForDisplay(file, source) {
  if (!source || source.format !== "DICOM") {
    try {
      const bitmap = await createImageBitmap(file);
      if (!source || (bitmap.width === source.width && bitmap.height === source.height)) return bitmap;
      bitmap.close();
    } catch (_) {
      // a format the browser cannot decode
    }
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch("explain?opacity=0", { method: "POST", headers: headers(), body: form });
  if (!response.ok) throw new Error(errorText(response, await readAnswer(response)));
  return await createImageBitmap(await response.blob());
}

async function drawPicture(card, file, map, source) {
  const bitmap = await decodeForDisplay(file, source);
  const base = card.querySelector("canvas.base");
  const overlay = card.querySelector("canvas.heatmap");
  const width = Math.min(bitmap.width, 720);
  const height = Math.max(1, Math.round((bitmap.height * width) / bitmap.width));
  for (const canvas of [base, overlay]) {
    canvas.width = width;
    canvas.height = height;
  }
  const context = base.getContext("2d");
  context.fillStyle = "#000"; // transparency over black, as the service composites it
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0, width, height);
  base.setAttribute("aria-label", `${file.name}${map ? ", with its heatmap" : ""}`);
  if (map) drawHeatmap(overlay, map);
  overlay.style.opacity = opacityInput.value;
  card.dataset.drawn = "true";
}

// One pixel per cell, signed colours, alpha by |value| relative to the map's largest; the browser's
// bilinear smoothing stretches it over the image (the model saw the whole image squashed to a square,
// so each cell covers the same fraction of the image's width and height).
function drawHeatmap(canvas, map) {
  const [rows, cols] = map.grid;
  const scale = Math.max(...map.values.map(Math.abs));
  const cells = document.createElement("canvas");
  cells.width = cols;
  cells.height = rows;
  const context = cells.getContext("2d");
  const image = context.createImageData(cols, rows);
  map.values.forEach((value, index) => {
    const t = scale > 0 ? Math.max(-1, Math.min(1, value / scale)) : 0;
    const color = t >= 0 ? TOWARD_PNEUMONIA : TOWARD_NORMAL;
    image.data.set([...color, Math.round(255 * Math.abs(t))], index * 4);
  });
  context.putImageData(image, 0, 0);
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = true;
  target.imageSmoothingQuality = "high";
  target.drawImage(cells, 0, 0, canvas.width, canvas.height);
}

opacityInput.addEventListener("input", () => {
  for (const canvas of document.querySelectorAll("canvas.heatmap")) canvas.style.opacity = opacityInput.value;
});

$("#files").addEventListener("change", (event) => {
  const files = [...event.target.files];
  event.target.value = ""; // so choosing the same file again scores it again
  if (files.length) score(files);
});

const drop = $("#drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  // A dropped folder is an entry the browser cannot read as a file (fetch fails on it): left out, and said so.
  const entries = [...event.dataTransfer.items].filter((item) => item.kind === "file");
  const isFolder = (index) => entries[index] && entries[index].webkitGetAsEntry()?.isDirectory;
  const all = [...event.dataTransfer.files];
  const files = all.filter((_, index) => !isFolder(index));
  const folders = all.length - files.length;
  const note = folders ? ` ${folders} folder${folders > 1 ? "s" : ""} left out: drop the files inside.` : "";
  if (files.length) score(files, note);
  else if (folders) statusLine.textContent = note.trim();
});

showModel();
