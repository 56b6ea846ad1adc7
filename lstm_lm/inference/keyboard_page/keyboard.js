// The page of `lstm-lm export --format web`: next-word suggestions from the exported
// model (model.onnx, one step of the model: a token and the state in, the scores of
// every token and the new state out), run by onnxruntime-web in this page.
//
// The model's memory is kept from keystroke to keystroke: each word finished costs one
// step, and the letters of the word being typed only narrow the suggestions to the
// words that start with them. Editing earlier text makes the page read the text again.
// The suggestions are the ones `LanguageModel.suggest` gives in Python: the k likeliest
// words of the vocabulary that start with what is typed, ties to the lower token id.
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

  let vocab, session, tokens, ids, offered;
  let state = [];        // one Float32Array per state input, batch 1
  let scores = null;     // the scores of every token after the words read
  let read = [];         // the words read so far (after the opening <eos>)

  function fail(message) {
    kb.error = message;
    status.textContent = "error: " + message;
    status.classList.add("error");
  }

  async function step(id) {
    const feeds = { input_ids: new ort.Tensor("int64", BigInt64Array.from([BigInt(id)]), [1]) };
    vocab.states.forEach((s, i) => { feeds[s.name] = new ort.Tensor("float32", state[i], [1, s.size]); });
    const out = await session.run(feeds);
    scores = out.scores.data;
    state = vocab.states.map((s) => out[s.name + "_out"].data);
  }

  async function reset() {
    state = vocab.states.map((s) => new Float32Array(s.size));
    read = [];
    await step(vocab.eos);  // every text is read after an <eos>, as in training
  }

  function normal(text) {
    return vocab.lowercase ? text.toLowerCase() : text;
  }

  // Read the finished words of `text` (before its last space): only the new ones when
  // the text grew, all of them when something before was changed. Returns the steps run.
  async function sync(words) {
    let same = 0;
    while (same < read.length && same < words.length && read[same] === words[same]) same++;
    let steps = 0;
    if (same < read.length) { await reset(); same = 0; steps++; }
    for (const word of words.slice(same)) {
      await step(ids.has(word) ? ids.get(word) : vocab.unk);
      read.push(word);
      steps++;
    }
    return steps;
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
        const shown = suggest(normal(typed), vocab.suggestions);
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
    session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
    await reset();
    facts.textContent = `a ${vocab.cell} model, ${vocab.parameters.toLocaleString("en")} parameters, ` +
      `${tokens.length.toLocaleString("en")} words`;
    box.disabled = false;
    box.addEventListener("input", update);
    await update();
    box.focus();
    kb.ready = true;
  } catch (e) {
    fail(String(e));
  }
})();
