// charloom's page: generate with streaming, compare temperatures, and watch the next-character
// distribution change with the temperature. A model trained on records (names, quotes, rows) gets a
// "how many" control, a label picker when it has labels, and its records as a list. No framework, no
// build step. Model output is only ever inserted as text (textContent / text nodes), never as HTML.
"use strict";

const COMPARE_TEMPERATURES = [0.2, 0.5, 1.0, 1.2];
const CHART_ROWS = 16;
const $ = (id) => document.getElementById(id);
let running = [];          // AbortControllers of the streams in flight
let chartRequest = 0;      // only the newest chart answer is drawn
let chartTimer = null;
let models = {};           // model id -> its "charloom" entry of /v1/models (shape, records)

// The chosen model's records ({format, separator, labels}), or null for a model of one stream of text.
function records() {
  const info = models[$("model").value];
  return info && info.records ? info.records : null;
}

function settings() {
  const seedText = $("seed").value.trim();
  return {
    model: $("model").value || undefined,
    temperature: Number($("temperature").value),
    top_k: Number($("top-k").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("length").value),
    seed: seedText === "" ? null : Number(seedText),
    ...(records() ? { n: Number($("count").value), label: $("label").value || undefined } : {}),
  };
}

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// POST a streaming completion; call onText(text, choice index) for every piece and onFinish(choice) as
// each choice ends; resolve to the last finish reason.
async function streamCompletion(body, onText, signal, onFinish) {
  const response = await fetch("/v1/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true, unknown: "replace" }),
    signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.text) onText(choice.text, choice.index);
          if (choice.finish_reason) {
            finish = choice.finish_reason;
            if (onFinish) onFinish(choice);
          }
        }
      }
    }
  }
}

function startRun() {
  stopAll();
  const controller = new AbortController();
  running.push(controller);
  $("stop").disabled = false;
  return controller;
}

function stopAll() {
  for (const c of running) c.abort();
  running = [];
  $("stop").disabled = true;
}

// A <pre> grows by text nodes; the prompt is a separate, dimmer span.
function fillWithPrompt(pre, prompt) {
  pre.replaceChildren();
  const span = document.createElement("span");
  span.className = "prompt";
  span.textContent = prompt;
  pre.append(span);
}

// A list of n records, each starting with the prompt: pieces go to their choice's item; as an item ends it
// gets its finish reason and, for a model with labels, the label (asked for, or chosen by the model).
function recordList(list, n, prompt, label) {
  const items = Array.from({ length: n }, () => {
    const item = document.createElement("li");
    if (label) item.append(labelBadge(label));
    const start = document.createElement("span");
    start.className = "prompt";
    start.textContent = prompt;
    item.append(start);
    return item;
  });
  list.replaceChildren(...items);
  return {
    onText: (text, index) => items[index].append(text),
    onFinish: (choice) => {
      const item = items[choice.index];
      item.dataset.finish = choice.finish_reason;
      if (choice.label && !item.querySelector(".label")) item.prepend(labelBadge(choice.label));
    },
  };
}

function labelBadge(label) {
  const badge = document.createElement("span");
  badge.className = "label";
  badge.textContent = label;
  return badge;
}

// Where a run's text goes: the records list for a records model, else one <pre> after the prompt.
function textView(pre, list, s, prompt) {
  if (records()) return recordList(list, s.n, prompt, s.label);
  fillWithPrompt(pre, prompt);
  return { onText: (text) => pre.append(text), onFinish: null };
}

async function generate() {
  const controller = startRun();
  const prompt = $("prompt").value;
  const s = settings();
  const view = textView($("output"), $("records"), s, prompt);
  setStatus("generating…", "busy");
  try {
    const finish = await streamCompletion({ ...s, prompt }, view.onText, controller.signal, view.onFinish);
    setStatus(records() ? `done (${s.n} records)` : `done (${finish})`, "done");
  } catch (e) {
    setStatus(controller.signal.aborted ? "stopped" : `error: ${e.message}`, controller.signal.aborted ? "stopped" : "error");
  } finally {
    running = running.filter((c) => c !== controller);
    $("stop").disabled = running.length === 0;
  }
}

async function compare() {
  const controller = startRun();
  const prompt = $("prompt").value;
  const base = settings();
  if (base.seed === null) base.seed = Math.floor(Math.random() * 2 ** 31);
  $("compare-seed").textContent = `(seed ${base.seed}, same for every column)`;
  const grid = $("compare-grid");
  grid.replaceChildren();
  setStatus("comparing…", "busy");
  const jobs = COMPARE_TEMPERATURES.map((t) => {
    const column = document.createElement("div");
    column.className = "column";
    const title = document.createElement("h3");
    title.textContent = `T = ${t}`;
    const output = document.createElement(records() ? "ol" : "pre");
    output.dataset.temperature = String(t);
    if (records()) output.className = "records";
    const view = textView(output, output, base, prompt);
    column.append(title, output);
    grid.append(column);
    return streamCompletion({ ...base, temperature: t, prompt }, view.onText, controller.signal, view.onFinish);
  });
  try {
    await Promise.all(jobs);
    setStatus("comparison done", "done");
  } catch (e) {
    controller.abort();
    setStatus(controller.signal.aborted && !e.message ? "stopped" : `error: ${e.message}`, "error");
  } finally {
    running = running.filter((c) => c !== controller);
    $("stop").disabled = running.length === 0;
  }
}

// -- the distribution chart ------------------------------------------------------------------------
function visible(token) {
  if (token === "\u0003") return "end";  // a records model's end of text
  if (/^[\ue000-\uf8ff]$/.test(token)) return "label";  // a label's private-use character
  return token === " " ? "␣" : token === "\n" ? "↵" : token === "\t" ? "⇥" : token;
}

function percent(p) {
  return p >= 0.1 ? `${(100 * p).toFixed(0)}%` : p >= 0.001 ? `${(100 * p).toFixed(1)}%` : p > 0 ? "<0.1%" : "0";
}

function scheduleChart() {
  clearTimeout(chartTimer);
  chartTimer = setTimeout(updateChart, 40);
}

async function updateChart() {
  const prompt = $("prompt");
  const context = prompt.value.slice(0, prompt.selectionStart ?? prompt.value.length);
  const s = settings();
  const id = ++chartRequest;
  let body;
  try {
    const response = await fetch("/v1/next", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: s.model, prompt: context, temperature: s.temperature, top_k: s.top_k,
                             top_p: s.top_p, label: s.label, unknown: "replace" }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    body = await response.json();
  } catch (e) {
    if (id === chartRequest) $("chart").dataset.error = e.message;
    return;
  }
  if (id !== chartRequest) return;  // a newer request was sent meanwhile
  drawChart(body, context);
}

function bar(kind, p) {
  const track = document.createElement("div");
  track.className = `track ${kind}`;
  const fill = document.createElement("div");
  fill.className = "fill";
  fill.style.width = `${(100 * p).toFixed(2)}%`;  // CSSOM, allowed by the page's CSP
  const value = document.createElement("span");
  value.className = `value value-${kind}`;
  value.textContent = percent(p);
  track.append(fill, value);
  return track;
}

function drawChart(body, context) {
  const tail = context.slice(-24);
  $("context").textContent = (context.length > 24 ? "…" : "") + tail.replace(/\n/g, "↵");
  $("chart-temperature").textContent = Number(body.temperature).toFixed(2);
  const chart = $("chart");
  delete chart.dataset.error;
  const shown = body.tokens.slice(0, CHART_ROWS);
  const rest = body.tokens.slice(CHART_ROWS);
  const rows = shown.map((t) => [visible(t.token), t.prob, t.reweighted, t.token]);
  if (rest.length) {
    rows.push([`other ${rest.length}`, rest.reduce((a, t) => a + t.prob, 0), rest.reduce((a, t) => a + t.reweighted, 0), null]);
  }
  chart.replaceChildren(...rows.map(([label, p, q, token]) => {
    const row = document.createElement("div");
    row.className = token === null ? "row others" : "row";
    const name = document.createElement("span");
    name.className = "token";
    name.textContent = label;
    row.append(name, bar("original", p), bar("reweighted", q));
    return row;
  }));
  chart.dataset.temperature = String(body.temperature);
}

// -- wiring ----------------------------------------------------------------------------------------
function showSliders() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  const k = Number($("top-k").value);
  $("top-k-value").textContent = k === 0 ? "off" : String(k);
  $("top-p-value").textContent = Number($("top-p").value).toFixed(2);
  $("length-value").textContent = $("length").value;
}

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) {
    setStatus(`error: ${await errorMessage(response)}`, "error");
    return;
  }
  const body = await response.json();
  const select = $("model");
  models = Object.fromEntries(body.data.map((m) => [m.id, m.charloom]));
  select.replaceChildren(...body.data.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    const c = m.charloom;
    option.dataset.info = c ? `${c.arch} ${c.layers}×${c.hidden}, ${c.parameters.toLocaleString()} parameters, ` +
      `${c.vocab_size} symbols` + (c.records ? `, trained on ${c.records.format} records` : "") : "";
    return option;
  }));
  showModelInfo();
}

// The controls and output of the chosen model: records (a count, labels, a list) or one stream of text.
function showModelInfo() {
  const option = $("model").selectedOptions[0];
  $("model-info").textContent = option ? option.dataset.info : "";
  const rec = records();
  for (const element of document.querySelectorAll(".records-only")) element.hidden = !rec;
  $("label-field").hidden = !(rec && rec.labels.length);
  $("output").hidden = Boolean(rec);
  $("records").hidden = !rec;
  $("label").replaceChildren(...["", ...(rec ? rec.labels : [])].map((value) => {
    const choice = document.createElement("option");
    choice.value = value;
    choice.textContent = value === "" ? "any (the model picks)" : value;
    return choice;
  }));
  // A record starts from nothing; the page's opening prompt is for a model of running text.
  const prompt = $("prompt");
  if (rec && prompt.value === prompt.defaultValue) prompt.value = "";
  document.body.dataset.view = rec ? "records" : "text";
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const id of ["temperature", "top-k", "top-p", "length"]) {
    $(id).addEventListener("input", () => { showSliders(); if (id !== "length") scheduleChart(); });
  }
  for (const event of ["input", "click", "keyup", "select"]) $("prompt").addEventListener(event, scheduleChart);
  $("model").addEventListener("change", () => { showModelInfo(); scheduleChart(); });
  $("label").addEventListener("change", scheduleChart);
  $("generate").addEventListener("click", generate);
  $("compare").addEventListener("click", compare);
  $("stop").addEventListener("click", () => { stopAll(); setStatus("stopped", "stopped"); });
  showSliders();
  await loadModels();
  const prompt = $("prompt");
  prompt.setSelectionRange(prompt.value.length, prompt.value.length);
  updateChart();
});
