// The page of `lstm-lm export --format web`: next-word suggestions from the exported
// model (model.onnx, one step of the model: a token and the state in, the scores of
// every token and the new state out), run by onnxruntime-web in this page.
//
// The model's memory is kept from keystroke to keystroke. A word model reads each
// finished word in one step, and the letters of the word being typed only narrow the
// suggestions to the vocabulary's words that start with them (the k likeliest, ties
// to the lower token id). A character model reads each character typed in one step,
// then searches for the likeliest endings of the word (CharKeyboard in
// lstm_lm/inference/keystrokes.py: the same beam search). Editing earlier text makes
// the page read the text again. Either way the suggestions are the ones
// `LanguageModel.suggest` gives in Python.
"use strict";

(async function () {
  const box = document.getElementById("text");
  const row = document.getElementById("suggestions");
  const status = document.getElementById("status");
  const facts = document.getElementById("model");
  // What a test (or a curious reader) can look at: the suggestions shown, for which
  // text, and how long each update took.
  const kb = { ready: false, error: null, shown: [], shownFor: null, timings: [] };
  window.lstmKeyboard = kb;

  let vocab, session, tokens, ids, offered, char;
  let state = [];        // one Float32Array per state input, batch 1
  let scores = null;     // the scores of every token after the text read
  let read = [];         // the tokens read so far (after the opening <eos>): words, or characters

  function fail(message) {
    kb.error = message;
    status.textContent = "error: " + message;
    status.classList.add("error");
  }

  // One step of the model for a batch: token ids, and per state input a Float32Array
  // of the batch's rows. Returns the scores (B x V, flat) and the new state.
  async function run(batchIds, batchState) {
    const B = batchIds.length;
    const feeds = { input_ids: new ort.Tensor("int64", BigInt64Array.from(batchIds.map(BigInt)), [B]) };
    vocab.states.forEach((s, i) => { feeds[s.name] = new ort.Tensor("float32", batchState[i], [B, s.size]); });
    const out = await session.run(feeds);
    return { scores: out.scores.data, state: vocab.states.map((s) => out[s.name + "_out"].data) };
  }

  async function step(id) {
    ({ scores, state } = await run([id], state));
  }

  async function reset() {
    state = vocab.states.map((s) => new Float32Array(s.size));
    read = [];
    await step(vocab.eos);  // every text is read after an <eos>, as in training
  }

  function normal(text) {
    return vocab.lowercase ? text.toLowerCase() : text;
  }

  // Read the tokens of the text (a word model: the finished words; a character model:
  // every character): only the new ones when the text grew, all of them when something
  // before was changed. Returns the steps run.
  async function sync(tokensNow) {
    let same = 0;
    while (same < read.length && same < tokensNow.length && read[same] === tokensNow[same]) same++;
    let steps = 0;
    if (same < read.length) { await reset(); same = 0; steps++; }
    for (const token of tokensNow.slice(same)) {
      await step(ids.has(token) ? ids.get(token) : vocab.unk);
      read.push(token);
      steps++;
    }
    return steps;
  }

  function logSoftmax(row) {
    let max = -Infinity;
    for (const x of row) if (x > max) max = x;
    let sum = 0;
    for (const x of row) sum += Math.exp(x - max);
    const norm = max + Math.log(sum);
    return Float64Array.from(row, (x) => x - norm);
  }

  function logSumExp(row, which) {
    let max = -Infinity;
    for (const i of which) if (row[i] > max) max = row[i];
    if (max === -Infinity) return max;
    let sum = 0;
    for (const i of which) sum += Math.exp(row[i] - max);
    return max + Math.log(sum);
  }

  // A character model: the k likeliest endings of the word being typed, by the beam
  // search of CharKeyboard.search (keystrokes.py), step for step.
  async function searchEndings(typed, k) {
    const V = tokens.length;
    let endings = [""], soFar = [0], logp = [logSoftmax(scores)], rows = state;
    const found = new Map();
    for (let n = 0; n <= vocab.max_chars; n++) {
      endings.forEach((ending, b) => {
        if (typed + ending) found.set(typed + ending, soFar[b] + logSumExp(logp[b], vocab.ends));
      });
      if (n === vocab.max_chars) break;
      const values = [...found.values()].sort((a, b) => b - a);
      const kth = values.length >= k ? values[k - 1] : -Infinity;
      const best = [];  // the beam's best (value, row, char), by value, then by row and char
      for (let b = 0; b < endings.length; b++) {
        for (const c of vocab.grows) {
          const v = soFar[b] + logp[b][c];
          let at = best.length;
          while (at > 0 && v > best[at - 1].v) at--;
          if (at < vocab.beam) {
            best.splice(at, 0, { v, b, c });
            if (best.length > vocab.beam) best.pop();
          }
        }
      }
      const keep = best.filter((x) => x.v > kth);
      if (!keep.length) break;
      const gathered = vocab.states.map((s, i) => {
        const rowsOut = new Float32Array(keep.length * s.size);
        keep.forEach((x, j) => rowsOut.set(rows[i].subarray(x.b * s.size, (x.b + 1) * s.size), j * s.size));
        return rowsOut;
      });
      const out = await run(keep.map((x) => x.c), gathered);
      endings = keep.map((x) => endings[x.b] + tokens[x.c]);
      soFar = keep.map((x) => x.v);
      logp = keep.map((_, j) => logSoftmax(out.scores.subarray(j * V, (j + 1) * V)));
      rows = out.state;
    }
    return [...found.entries()].sort((a, b) => b[1] - a[1]).slice(0, k).map(([word]) => word);
  }

  // The k best offered words that start with `typed`: higher score first, then lower id.
  function suggest(typed, k) {
    const best = [];
    for (const id of offered) {
      if (typed && !tokens[id].startsWith(typed)) continue;
      const s = scores[id];
      let at = best.length;
      while (at > 0 && s > scores[best[at - 1]]) at--;  // ids ascend: an equal score stays after
      if (at < k) {
        best.splice(at, 0, id);
        if (best.length > k) best.pop();
      }
    }
    return best.map((id) => tokens[id]);
  }

  function render(words, forText) {
    row.replaceChildren(...words.map((word) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "suggestion";
      b.textContent = word;
      b.addEventListener("click", () => take(word));
      return b;
    }));
    row.dataset.for = forText;
    kb.shown = words;
    kb.shownFor = forText;
  }

  // Punctuation, as the tokenizer's Punctuation pre-tokenizer isolates it: Unicode's
  // punctuation and ASCII's other symbols.
  const PUNCTUATION = /([\p{P}!-\/:-@\[-`{-~])/u;

  function split(text) {
    const cut = text.search(/\s\S*$/);  // the last whitespace
    const done = cut < 0 ? "" : text.slice(0, cut);
    const typed = cut < 0 ? text : text.slice(cut + 1);
    if (char) return { done, typed, words: [...normal(text)] };  // every character is read
    let words = normal(done).split(/\s+/).filter(Boolean);
    if (vocab.split_punctuation) words = words.flatMap((w) => w.split(PUNCTUATION).filter(Boolean));
    return { done, typed, words };
  }

  function take(word) {
    const { done } = split(box.value);
    box.value = (done ? done + " " : "") + word + " ";
    box.focus();
    update();
  }

  let busy = false;
  async function update() {
    if (busy) return;  // the running update reads the box again when it ends
    busy = true;
    try {
      for (;;) {
        const text = box.value;
        const started = performance.now();
        const { words, typed } = split(text);
        const steps = await sync(words);
        const shown = char ? await searchEndings(normal(typed), vocab.suggestions)
          : suggest(normal(typed), vocab.suggestions);
        render(shown, text);
        kb.timings.push({ ms: performance.now() - started, steps });
        if (box.value === text) break;
      }
    } catch (e) {
      fail(String(e));
    } finally {
      busy = false;
    }
  }

  try {
    ort.env.wasm.numThreads = 1;  // no SharedArrayBuffer needed: any static host serves the page
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
    vocab = await (await fetch("vocab.json")).json();
    tokens = vocab.tokens;
    ids = new Map(tokens.map((t, i) => [t, i]));
    offered = vocab.offered;
    char = vocab.kind === "char";
    session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
    await reset();
    facts.textContent = `a ${vocab.cell} model, ${vocab.parameters.toLocaleString("en")} parameters, ` +
      `${tokens.length.toLocaleString("en")} ${char ? "characters" : "words"}`;
    box.disabled = false;
    box.addEventListener("input", update);
    await update();
    box.focus();
    kb.ready = true;
  } catch (e) {
    fail(String(e));
  }
})();
