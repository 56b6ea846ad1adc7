// The lstm-lm page: next-word suggestions as you type, a completion button, and a
// picture of the model's gates and memory after each word. Plain JavaScript, served
// as is by `lstm-lm serve`; it talks to the JSON API under /v1.
"use strict";

const $ = (id) => document.getElementById(id);
const prompt = $("prompt");
const EXAMPLE = "My name is John, I am from Tamilnadu and I speak";
const SVG = "http://www.w3.org/2000/svg";
let latest = 0; // the newest request's number: answers to older ones are dropped
let compare = null; // {word, other}: also read the prompt with `other` for `word`

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "muted error" : "muted";
}

async function describeModel() {
  const m = await (await fetch("/v1/model")).json();
  const sizes = m.hidden_sizes.every((h) => h === m.hidden_sizes[0])
    ? `${m.layers} layer${m.layers > 1 ? "s" : ""} of ${m.hidden_sizes[0]} units` : `layers of ${m.hidden_sizes.join(", ")} units`;
  const ppl = m.valid_perplexity ? ` · validation perplexity ${m.valid_perplexity.toFixed(2)}` : "";
  $("model").textContent = `${m.cell.toUpperCase()} · ${sizes} · ${m.parameters.toLocaleString()} parameters · ` +
    `${m.vocab_size.toLocaleString()} ${m.tokenizer === "word" ? "words" : m.tokenizer + " tokens"} · trained on ${m.corpus}${ppl}`;
  $("inside-title").textContent = `Inside ${m.cell_title || "the model"}`;
  if (m.gates && m.gates.length === 0) {
    $("inside-help").textContent = "After each word: how big its state h is and how much each word changed it. " +
      "This cell has no gates: it rewrites its whole state at every step.";
  }
}

async function update() {
  const text = prompt.value;
  const mine = ++latest;
  if (!text.trim()) {
    $("suggestions").replaceChildren();
    $("picture").replaceChildren();
    setStatus("");
    return;
  }
  try {
    const traceBody = { prompt: text, top_k: 3, units: 12 };
    if (compare && text.includes(compare.word)) traceBody.swap = compare;
    const [next, trace] = await Promise.all([post("/v1/next", { prompt: text, k: 5 }), post("/v1/trace", traceBody)]);
    if (mine !== latest) return;
    showSuggestions(next.words);
    drawTrace(trace);
    setStatus("");
  } catch (e) {
    if (mine !== latest) return;
    if (compare) { compare = null; return update(); } // the compared word is gone: draw without it
    $("suggestions").replaceChildren();
    setStatus(e.message, true);
  }
}

function showSuggestions(words) {
  const buttons = words.map(({ word, p }) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "suggestion";
    b.dataset.word = word;
    b.append(word);
    const span = document.createElement("span");
    span.className = "p";
    span.textContent = `${(100 * p).toFixed(p >= 0.1 ? 0 : 1)}%`;
    b.append(span);
    b.addEventListener("click", () => append(word));
    return b;
  });
  $("suggestions").replaceChildren(...buttons);
}

function append(word) {
  const text = prompt.value;
  const glue = !text || /\s$/.test(text) || /^[.,!?;:%)'\]]+$/.test(word) ? "" : " ";
  prompt.value = text + glue + word + " ";
  prompt.focus();
  update();
}

async function complete() {
  if (!prompt.value.trim()) return;
  $("complete").disabled = true;
  try {
    const r = await post("/v1/complete", { prompt: prompt.value, words: 20 });
    if (r.completion) append(r.completion.trim());
    setStatus(r.note || "");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("complete").disabled = false;
  }
}

// -- the picture ----------------------------------------------------------------------

function el(name, attrs, parent, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.append(node);
  return node;
}

// 0..1 -> a sequential colour (closed: pale, open: dark blue)
function gateColour(v) {
  const stops = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  const x = Math.min(Math.max(v, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
  const c = stops[i].map((a, j) => Math.round(a + f * (stops[i + 1][j] - a)));
  return `rgb(${c.join(",")})`;
}

// signed -> a diverging colour (negative blue, positive red)
function signedColour(v, max) {
  const t = Math.min(Math.abs(v) / (max || 1), 1);
  const [r, g, b] = v >= 0 ? [215, 48, 39] : [69, 117, 180];
  const mix = (a) => Math.round(255 + t * (a - 255));
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

function title(node, text) { el("title", {}, node, text); }

function drawTrace(t) {
  const T = t.tokens.length, colW = 58, left = 180, unitH = 6, meanH = 18, barH = 54, gap = 16;
  const gates = Object.entries(t.gates);
  const width = left + T * colW + 10;
  const svg = el("svg", { id: "gates", width, "data-cell": t.cell });
  const x = (i) => left + i * colW;

  // tokens, rotated, along the top
  t.tokens.forEach((tok, i) => {
    const label = el("text", { x: x(i) + colW / 2, y: 70, transform: `rotate(-35 ${x(i) + colW / 2} 70)`,
                               class: "token", "data-index": i }, svg, tok);
    // Click a word: read the prompt again with the word the model found likeliest in its place.
    const other = i > 0 ? (t.guesses[i - 1].map(([w]) => w).find((w) => w !== tok) || "<unk>") : "<unk>";
    title(label, `click: compare with the memory of the prompt with “${other}” in place of “${tok}”`);
    label.addEventListener("click", () => { compare = { word: tok, other }; update(); });
  });
  let y = 80;

  if (!gates.length) {
    el("text", { x: 4, y: y + 14, class: "label" }, svg, t.note || "no gates");
    y += 28;
  }
  for (const [name, g] of gates) {
    const group = el("g", { class: "gate", "data-gate": name }, svg);
    el("text", { x: 4, y: y + 13, class: "label" }, group, `${name} gate`);
    el("text", { x: 4, y: y + meanH + 12, class: "small" }, group, `${g.units.length} units`);
    g.mean.forEach((v, i) => {
      const r = el("rect", { x: x(i) + 1, y, width: colW - 2, height: meanH, fill: gateColour(v), class: "cell mean" }, group);
      title(r, `${t.tokens[i]}: mean ${name} gate ${v.toFixed(3)}`);
      el("text", { x: x(i) + colW / 2, y: y + 13, "text-anchor": "middle", class: "small",
                   style: v > 0.55 ? "fill:white" : "" }, group, v.toFixed(2));
    });
    const top = y + meanH + 2;
    g.values.forEach((row, i) => row.forEach((v, u) => {
      const r = el("rect", { x: x(i) + 1, y: top + u * unitH, width: colW - 2, height: unitH, fill: gateColour(v), class: "cell" }, group);
      title(r, `${t.tokens[i]}: unit ${g.units[u]} ${v.toFixed(3)}`);
    }));
    y = top + g.units.length * unitH + gap;
  }

  const bars = (label, values, cls, colour, hint, mark) => {
    const group = el("g", { class: cls }, svg);
    const max = Math.max(...values, 1e-9);
    el("text", { x: 4, y: y + 14, class: "label" }, group, label);
    el("text", { x: 4, y: y + 30, class: "small" }, group, hint);
    const best = mark ?? values.indexOf(Math.max(...values)); // the bar drawn in colour
    values.forEach((v, i) => {
      const h = (barH - 12) * v / max;
      const r = el("rect", { x: x(i) + 8, y: y + barH - h, width: colW - 16, height: h,
                             fill: i === best ? colour : "#b8c2cc", class: "bar", "data-token": t.tokens[i] }, group);
      title(r, `${t.tokens[i]}: ${v.toFixed(3)}`);
      el("text", { x: x(i) + colW / 2, y: y + barH - h - 2, "text-anchor": "middle", class: "small" }, group, v.toFixed(1));
    });
    y += barH + gap;
    return best;
  };
  const m = t.memory;
  bars(`|${m}|, the memory`, t.norms[m], "norm", "#444", "its size after each word");
  bars(`|Δ${m}|, written`, t.memory_change, "change", "#ff7f0e", "how much each word changed it");
  const next = t.guesses[T - 1].map(([w, p]) => `${w} ${(100 * p).toFixed(0)}%`).join(", ");
  if (t.swap) {
    const s = t.swap;
    const from = s.distance.findIndex((d) => d > 1e-6);
    bars(`|${m} − ${m}'|`, s.distance, "swap", "#d62728", `${m}' with “${s.other}”`, from);
    const caption = el("text", { x: 4, y: y + 4, id: "caption", class: "label" }, svg);
    el("tspan", { x: 4 }, caption, `What the memory holds of “${s.word}”: written at “${t.tokens[from] ?? s.word}”, ` +
       `kept to the end (|${m} − ${m}'| = ${s.distance[T - 1].toFixed(1)} after “${t.tokens[T - 1]}”).`);
    el("tspan", { x: 4, dy: 18, class: "small" }, caption, `Next: ${next}; with “${s.other}” in its place: ` +
       s.guesses.map(([w, p]) => `${w} ${(100 * p).toFixed(0)}%`).join(", "));
  } else {
    el("text", { x: 4, y: y + 4, id: "caption", class: "small" }, svg,
       `Next: ${next}. Click a word above to see what the memory holds of it.`);
  }
  const drawn = y + (t.swap ? 30 : 14); // the picture's height, now that all is drawn
  svg.setAttribute("height", drawn);
  svg.setAttribute("viewBox", `0 0 ${width} ${drawn}`);
  $("picture").replaceChildren(svg);
}

let timer = null;
prompt.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 120); });
$("complete").addEventListener("click", complete);
$("clear").addEventListener("click", () => { prompt.value = ""; compare = null; update(); prompt.focus(); });
$("example").addEventListener("click", () => {
  prompt.value = EXAMPLE;
  compare = { word: "Tamilnadu", other: "Kerala" }; // where the memory of the region is written, and kept
  update();
});
describeModel().catch((e) => setStatus(`cannot reach the server: ${e.message}`, true));
if (prompt.value.trim()) update();
