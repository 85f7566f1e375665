// tuwen serve page: plain JS, no build step, no network but this server.
"use strict";
const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "tuwen.history";
let info = null;

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", !!isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || localStorage.getItem("tuwen.key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadInfo() {
  try {
    const r = await fetch("/health");
    info = await r.json();
    const d = info.defaults || {};
    $("model-info").textContent = `${info.model} · ${info.image_size}×${info.image_size} px · ` +
      (r.ok ? "ready" : info.status === "failed" ? "failed: " + info.error : "warming up…");
    $("n").max = info.max_n;
    if (d.top_k != null) $("top_k").placeholder = d.top_k;
    if (d.top_p != null) $("top_p").placeholder = d.top_p;
    if (d.temperature != null) $("temperature").placeholder = d.temperature;
    if (d.guidance_scale != null) $("guidance").placeholder = d.guidance_scale;
    $("rerank").disabled = !info.rerank;
    $("rerank").parentElement.title = info.rerank ? "rerank with " + info.rerank : "start the server with --clip DIR or --captioner DIR";
    $("key-box").hidden = !info.auth;
    if (!r.ok && info.status !== "failed") setTimeout(loadInfo, 2000);
  } catch (e) {
    $("model-info").textContent = "server unreachable";
    setTimeout(loadInfo, 3000);
  }
}

function numberField(id, body, name, parse) {
  const v = $(id).value.trim();
  if (v !== "") body[name] = parse(v);
}

function card(k) {
  const div = document.createElement("div");
  div.className = "card";
  const img = document.createElement("img");
  img.alt = "image " + (k + 1);
  img.dataset.index = k;
  img.addEventListener("click", () => enlarge(img));
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "waiting…";
  div.append(img, meta);
  return div;
}

function enlarge(img) {
  if (!img.src) return;
  $("big").src = img.src;
  $("download").href = img.src;
  $("download").download = `tuwen_${img.dataset.seed || "x"}_${img.dataset.index}.png`;
  $("overlay").hidden = false;
}

function parseEvents(buffer, onEvent) {
  // server-sent events: blocks separated by a blank line; returns the unparsed rest
  let i;
  while ((i = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, i);
    buffer = buffer.slice(i + 2);
    let event = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (data) onEvent(event, JSON.parse(data));
  }
  return buffer;
}

async function generate(ev) {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) { setStatus("type a prompt first", true); return; }
  const body = { prompt: prompt, n: parseInt($("n").value || "1", 10), stream: true };
  numberField("seed", body, "seed", (v) => parseInt(v, 10));
  numberField("top_k", body, "top_k", (v) => parseInt(v, 10));
  numberField("top_p", body, "top_p", parseFloat);
  numberField("temperature", body, "temperature", parseFloat);
  numberField("guidance", body, "guidance_scale", parseFloat);
  if ($("rerank").checked) body.rerank = true;
  const results = $("results");
  results.replaceChildren();
  results.dataset.state = "running";
  $("generate").disabled = true;
  const t0 = performance.now();
  setStatus("sending…");
  let cards = [], usedSeed = null, failed = false, warnings = "";
  try {
    const r = await fetch("/v1/images/generations", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      if (r.status === 401) $("key-box").hidden = false;
      if (r.status === 429) msg += " (retry in " + (r.headers.get("Retry-After") || "a few") + " s)";
      throw new Error(msg);
    }
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem("tuwen.key", key);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + dec.decode(value, { stream: true }), (event, data) => {
        if (event === "queued") {
          usedSeed = data.seed;
          cards = Array.from({ length: data.n }, (_, k) => card(k));
          results.append(...cards);
          warnings = (data.warnings || []).join(" · ");
          setStatus(`seed ${data.seed} · ${data.waiting} image(s) ahead in the queue…`);
        } else if (event === "partial" || event === "image") {
          const c = cards[data.index];
          const img = c.querySelector("img");
          img.src = "data:image/png;base64," + data.b64_json;
          img.dataset.seed = usedSeed;
          if (event === "image") {
            img.classList.add("final");
            c.querySelector(".meta").textContent = "done";
          } else {
            c.querySelector(".meta").textContent = `${data.codes_done}/${data.codes_total} codes`;
          }
          setStatus(`seed ${usedSeed} · generating…`);
        } else if (event === "done") {
          if (data.scorer) {  // reranked: best first, with scores
            const order = data.data.map((d) => d.index);
            results.replaceChildren(...order.map((k) => cards[k]));
            data.data.forEach((d) => { cards[d.index].querySelector(".meta").textContent = "score " + d.score.toFixed(3); });
          }
          setStatus(`seed ${data.seed} · ${data.data.length} image(s) in ${((performance.now() - t0) / 1000).toFixed(1)} s` +
                    (warnings ? " · warning: " + warnings : ""));
          addHistory({ prompt: prompt, seed: data.seed, n: body.n, at: Date.now() });
        } else if (event === "error") {
          throw new Error(data.error.message);
        }
      });
    }
  } catch (e) {
    failed = true;
    setStatus("error: " + e.message, true);
  } finally {
    $("generate").disabled = false;
    results.dataset.state = failed ? "error" : "done";
  }
}

function history() {
  try { return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]"); } catch (e) { return []; }
}

function addHistory(item) {
  const h = history().filter((x) => !(x.prompt === item.prompt && x.seed === item.seed));
  h.unshift(item);
  localStorage.setItem(HISTORY_KEY, JSON.stringify(h.slice(0, 20)));
  showHistory();
}

function showHistory() {
  const ul = $("history");
  ul.replaceChildren(...history().map((x) => {
    const li = document.createElement("li");
    li.textContent = x.prompt;
    const m = document.createElement("span");
    m.className = "muted";
    m.textContent = `seed ${x.seed} · ${x.n} image(s) · ${new Date(x.at).toLocaleString()}`;
    li.append(m);
    li.title = "use this prompt and seed again";
    li.addEventListener("click", () => { $("prompt").value = x.prompt; $("seed").value = x.seed; $("n").value = x.n; });
    return li;
  }));
}

$("form").addEventListener("submit", generate);
$("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2147483647); });
$("overlay").addEventListener("click", (e) => { if (e.target.id !== "download") $("overlay").hidden = true; });
$("clear-history").addEventListener("click", () => { localStorage.removeItem(HISTORY_KEY); showHistory(); });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit(); });
showHistory();
loadInfo();
