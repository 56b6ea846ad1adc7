"""The keyboard: the keystroke simulation against typing a word one prefix at a time, the
one-step ONNX graph and its int8 weights, `export --format web` and its errors, and the
exported page in headless Chromium against `LanguageModel.suggest`."""

import functools
import http.server
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import headless_chromium, tiny_sets, write_tiny_corpus
from typer.testing import CliRunner

from lstm_lm import LanguageModel
from lstm_lm.cli import app
from lstm_lm.errors import ArgumentError, DataError
from lstm_lm.inference import keyboard
from lstm_lm.inference.keystrokes import simulate

onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
pytest.importorskip("onnxruntime", reason="the export extra is not installed")

# Gboard's shape in miniature: a CIFG with a projection that ties to the embedding.
KEYBOARD_SETS = ["model.cell=cifg", "model.proj_size=8", "model.embedding_size=8", "model.tie_weights=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A keyboard-shaped word model and a character model, trained on the tiny corpus."""
    root = tmp_path_factory.mktemp("keyboard")
    corpus = write_tiny_corpus(root / "tiny")
    out = {"corpus": corpus}
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LSTM_LM_CACHE", str(root / "cache"))
        for kind, sets in (("word", [*KEYBOARD_SETS, "train.epochs=6"]), ("char", ["data.tokenizer=char"])):
            result = CliRunner().invoke(
                app, ["train", "--data", str(corpus), "--out", str(root / kind), *tiny_sets(corpus, *sets)]
            )
            assert result.exit_code == 0, result.output
            out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def lm(runs):
    return LanguageModel.load(runs["word"])


def typed_one_prefix_at_a_time(lm, line: str, k: int) -> tuple[int, int, int]:
    """The definition, followed literally with `suggest`: (keystrokes with, without, words)."""
    words = line.split()
    with_, without, counted = 0, 0, 0
    for n, word in enumerate(words):
        if not word.isalnum():
            continue
        counted += 1
        without += len(word) + 1
        context = " ".join(words[:n])
        for j in range(len(word)):
            if word in lm.suggest(f"{context} {word[:j]}" if context else word[:j], k):
                with_ += j + 1
                break
        else:
            with_ += len(word) + 1
    return with_, without, counted


@pytest.mark.parametrize("k", [1, 3])
def test_the_simulation_is_typing_each_prefix_and_looking_at_the_suggestions(lm, runs, k):
    lines = (runs["corpus"] / "test.txt").read_text().splitlines()[:4] + ["the cat zebra sat , on the mat"]
    for line in lines:
        report = simulate(lm, [line], k)
        with_, without, counted = typed_one_prefix_at_a_time(lm, line, k)
        assert (report.keystrokes_with, report.keystrokes_without, report.words) == (with_, without, counted)
        assert report.savings == pytest.approx(1 - with_ / without)
    # top-1 and top-k recall: the word among the suggestions before its first letter
    line = lines[0]
    words = line.split()
    hits = [words[n] in lm.suggest(" ".join(words[:n]) + " " if n else "", k) for n in range(len(words))]
    first = [lm.suggest(" ".join(words[:n]) + " " if n else "", 1) == [words[n]] for n in range(len(words))]
    report = simulate(lm, [line], k)
    assert report.topk == pytest.approx(sum(hits) / len(words))
    assert report.top1 == pytest.approx(sum(first) / len(words))


def test_unknown_words_cost_their_length_and_punctuation_is_not_typed(lm):
    report = simulate(lm, ["zebra , ."], 3)
    assert (report.words, report.out_of_vocabulary) == (1, 1)
    assert report.keystrokes_with == report.keystrokes_without == len("zebra") + 1
    assert report.savings == 0 and report.topk == 0


def test_more_suggestions_save_at_least_as_much_and_k_is_checked(lm, runs):
    lines = (runs["corpus"] / "test.txt").read_text().splitlines()
    savings = [simulate(lm, lines, k).savings for k in (1, 2, 3, 5)]
    assert savings == sorted(savings) and savings[-1] > 0.3
    with pytest.raises(ArgumentError, match="at least 1"):
        simulate(lm, lines, 0)
    with pytest.raises(DataError, match="no words to type"):
        simulate(lm, [", . ;", ""], 3)
    assert lm.keystrokes(lines)["savings"] == pytest.approx(savings[2], abs=1e-4)


def test_a_character_model_suggests_the_likeliest_endings_of_the_word(runs):
    char = LanguageModel.load(runs["char"])
    for text in ("the c", "a bird s", "the "):
        words = char.suggest(text, 3)
        typed = text.split(" ")[-1]
        assert len(words) == 3 == len(set(words)) and all(w.startswith(typed) for w in words)
        # best first: the probability of each word's ending and a word end after it, read step by step
        logp = [_word_logp(char, text, w[len(typed) :]) for w in words]
        assert logp == sorted(logp, reverse=True), (words, logp)
    # the search's best word is at least as likely as every word of up to 3 more letters, all tried
    for text in ("the ca", "a b"):
        found = char.suggest(text, 1)[0]
        typed = text.split(" ")[-1]
        assert _word_logp(char, text, found[len(typed) :]) >= _best_short_word(char, text, 3) - 1e-6


@torch.no_grad()
def _read(lm, text):
    kb = lm.keyboard
    ids = [kb.ids["<eos>"]] + [kb.ids[c] for c in text]
    out, state = lm.model.features(torch.tensor(ids)[:, None])
    return torch.log_softmax(lm.model.scores(out[-1]).double(), -1), state


@torch.no_grad()
def _word_logp(lm, text, ending):
    """log p(the ending's characters, then a word end | text)."""
    kb = lm.keyboard
    logp, state = _read(lm, text)
    total = 0.0
    for c in ending:
        total += float(logp[0, kb.ids[c]])
        h, state = lm.model.step_hidden(torch.tensor([kb.ids[c]]), state)
        logp = torch.log_softmax(lm.model.scores(h).double(), -1)
    return total + float(torch.logsumexp(logp[0, kb.ends], 0))


@torch.no_grad()
def _best_short_word(lm, text, n):
    """The largest log p of a word that ends the typed letters with at most n more, every one tried."""
    kb = lm.keyboard
    logp, state = _read(lm, text)
    grows = kb.grows.nonzero().flatten()
    so_far, best = torch.zeros(1, dtype=torch.float64), -math.inf
    for level in range(n + 1):
        best = max(best, float((so_far + torch.logsumexp(logp[:, kb.ends], 1)).max()))
        if level == n:
            break
        rows, chars = torch.arange(len(so_far)).repeat_interleave(len(grows)), grows.repeat(len(so_far))
        so_far = so_far[rows] + logp[rows, chars]
        state = [tuple(t[rows] for t in layer) for layer in state]
        h, state = lm.model.step_hidden(chars, state)
        logp = torch.log_softmax(lm.model.scores(h).double(), -1)
    return best


def test_keystrokes_need_a_word_model_and_bpe_has_no_keyboard(runs, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--keystrokes", "--checkpoint", str(runs["char"])])
    assert result.exit_code == 1 and "error: keystroke simulation needs a word model" in result.output
    with pytest.raises(ArgumentError, match="needs a word model"):
        simulate(LanguageModel.load(runs["char"]), ["the cat"], 3)
    corpus = runs["corpus"]
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "bpe"),
            *tiny_sets(corpus, "data.tokenizer=bpe", "data.vocab_size=40"),
        ],
    )
    assert result.exit_code == 0, result.output
    with pytest.raises(ArgumentError, match="word or character model"):
        LanguageModel.load(tmp_path / "bpe").suggest("the c")
    result = CliRunner().invoke(
        app, ["export", "--format", "web", str(tmp_path / "site"), "--checkpoint", str(tmp_path / "bpe")]
    )
    assert result.exit_code == 1 and "error: the web page reads word and character models" in result.output
    assert not (tmp_path / "site").exists()


def test_eval_keystrokes_prints_savings_latency_and_sizes(runs):
    result = CliRunner().invoke(app, ["eval", "--keystrokes", "--checkpoint", str(runs["word"]), "-k", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["protocol"] == "keystrokes" and out["k"] == 2 and out["words"] > 0
    assert 0 < out["savings"] < 1 and 0 <= out["top1"] <= out["topk"] <= 1
    for form in ("pytorch", "onnx_fp32", "onnx_int8"):
        assert 0 < out["latency"][form]["p50_ms"] <= out["latency"][form]["p95_ms"]
        assert out["latency"][form]["bytes"] > 0
    assert out["latency"]["threads"] == 1


def test_eval_keystrokes_errors(runs, tmp_path):
    def run(*args):
        return CliRunner().invoke(app, ["eval", "--keystrokes", "--checkpoint", str(runs["word"]), *args])

    result = run("--suggestions", "0")
    assert result.exit_code == 1 and "error: --suggestions: must be at least 1" in result.output
    result = run("--cache")
    assert result.exit_code == 1 and "error:" in result.output and "--keystrokes" in result.output
    punctuation = tmp_path / "punct"
    punctuation.mkdir()
    for split in ("train", "valid", "test"):
        (punctuation / f"{split}.txt").write_text(", . ;\n")
    result = run("--data", str(punctuation))
    assert result.exit_code == 1 and "error: the text has no words to type" in result.output
    assert "Traceback" not in result.output


# -- the one-step graph ----------------------------------------------------------------------


def test_the_step_graph_matches_pytorch_and_int8_keeps_a_tied_matrix_once(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(keyboard, "QUANTIZED_MIN", 16)  # the tiny model's matrices are small
    fp32 = keyboard.export_step(lm, tmp_path / "fp32.onnx")
    assert fp32["max_abs_diff"] < 1e-4
    int8 = keyboard.export_step(lm, tmp_path / "int8.onnx", int8=True)
    assert int8["bytes"] < fp32["bytes"] and int8["max_abs_diff"] < 1.0  # 8-dim rows: coarse, but close
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    stored = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert "model.embedding.weight_int8" in stored  # the embedding, which the output layer reads too
    assert not any("decoder.weight" in name for name in stored)
    assert len([n for n in graph.node if n.op_type == "Cast" and n.input[0].endswith("_int8")]) == len(stored)


def test_int8_weights_are_within_half_a_step_of_the_originals():
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(48, 30)).astype(np.float32)
    w[3] = 0  # an all-zero row keeps a usable scale
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)  # y = x @ w.T, w stored (30, 48)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 48])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 30])],
        [numpy_helper.from_array(w.T.copy(), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    keyboard.quantize_weights(proto)
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    scale = init["w_scale"]  # (30 rows, 3 groups of 16, 1)
    assert scale.shape == (30, 3, 1)
    scale = np.repeat(scale[:, :, 0], 16, axis=1)  # each entry's scale, (30, 48)
    back = init["w_int8"].astype(np.float32) * scale
    assert np.all(np.abs(back - w.T) <= scale / 2 + 1e-7)
    assert np.all(back[:, 3] == 0)
    # and as onnxruntime runs it: x @ w with the int8 weights turned back into float32
    import onnxruntime as ort

    x = np.random.default_rng(1).normal(size=(1, 48)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"x": x})[0], x @ back.T, atol=1e-5)


# -- export --format web -------------------------------------------------------------------


def test_export_web_writes_a_static_folder_and_never_overwrites_without_asking(runs, tmp_path):
    site = tmp_path / "site"
    result = CliRunner().invoke(app, ["export", "--format", "web", str(site), "--checkpoint", str(runs["word"])])
    if "onnxruntime-web is not installed" in result.output:
        pytest.skip("onnxruntime-web is not installed (bash scripts/setup.sh --web)")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for name in (
        "index.html",
        "keyboard.js",
        "style.css",
        "model.onnx",
        "vocab.json",
        *(f"ort/{f}" for f in keyboard.ORT_FILES),
    ):
        assert (site / name).is_file(), name
    vocab = json.loads((site / "vocab.json").read_text())
    lm = LanguageModel.load(runs["word"])
    assert vocab["tokens"] == [lm.tokenizer.id_to_token(i) for i in range(lm.vocab_size)]
    assert summary["model_bytes"] == (site / "model.onnx").stat().st_size
    # a folder with something in it is left alone without --overwrite
    (site / "index.html").write_text("mine")
    result = CliRunner().invoke(app, ["export", "--format", "web", str(site), "--checkpoint", str(runs["word"])])
    assert result.exit_code == 1 and "error:" in result.output and "--overwrite" in result.output
    assert (site / "index.html").read_text() == "mine"
    result = CliRunner().invoke(
        app, ["export", "--format", "web", "--out", str(site), "--overwrite", "--checkpoint", str(runs["word"])]
    )
    assert result.exit_code == 0, result.output
    assert "keyboard.js" in (site / "index.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "web", "{tmp}/d", "--int8", "--checkpoint", "{word}"], "int8 unless --fp32"),
        (["--format", "svg", "{tmp}/e", "--checkpoint", "{word}"], "must be onnx or web"),
        (["--format", "web", "{tmp}/f", "--out", "{tmp}/g", "--checkpoint", "{word}"], "give the place to write once"),
        (["--format", "onnx", "{tmp}/h.onnx", "--overwrite", "--checkpoint", "{word}"], "only for --format web"),
        (["--format", "onnx", "{tmp}/i.onnx", "--fp32", "--checkpoint", "{word}"], "only for --format web"),
    ],
)
def test_export_web_errors(runs, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, char=runs["char"], word=runs["word"]) for a in args]
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 1, result.output
    assert f"{message}" in result.output and result.output.count("error:") == 1
    assert not any(tmp_path.iterdir())


def test_export_web_without_onnxruntime_web_says_how_to_install_it(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_LM_ORT_WEB", str(tmp_path / "nowhere"))
    result = CliRunner().invoke(
        app, ["export", "--format", "web", str(tmp_path / "site"), "--checkpoint", str(runs["word"])]
    )
    assert result.exit_code == 1 and "bash scripts/setup.sh --web" in result.output
    assert not (tmp_path / "site").exists()


# -- the page in a real browser --------------------------------------------------------------


@pytest.fixture
def static_server(tmp_path):
    """A plain static file server on loopback, as any static host would serve the folder."""
    site = tmp_path / "site"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()


class Page:
    """The exported page in headless Chromium: type into its text box, read its suggestions."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.wait = driver, WebDriverWait(driver, 30)
        driver.get(url)
        self.wait.until(lambda d: self.state("ready") or self.state("error"))
        assert self.state("error") is None
        self.box = driver.find_element(By.ID, "text")

    def state(self, key: str):
        return self.driver.execute_script(f"return window.lstmKeyboard && window.lstmKeyboard.{key}")

    def type(self, text: str, clear: bool = True) -> list[str]:
        """Empty the box (as select-all and delete would), type `text` key by key, and
        return the suggestions once the page shows them for the whole text."""
        if clear:
            self.paste("")
        self.box.send_keys(text)
        want = self.box.get_attribute("value")
        self.wait.until(lambda d: self.state("shownFor") == want)
        return self.state("shown")

    def paste(self, text: str) -> list[str]:
        """Put `text` in the box at once, as a paste does (one input event), and return the
        suggestions once the page shows them for it: WebDriver types a key in a few
        milliseconds, so a page's worth of prompts is quicker pasted."""
        self.driver.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", self.box, text
        )
        self.wait.until(lambda d: self.state("shownFor") == text)
        return self.state("shown")


def _export_or_skip(lm, site, int8=True):
    try:
        keyboard.export_web(lm, site, int8=int8)
    except Exception as e:
        if "onnxruntime-web is not installed" in str(e):
            pytest.skip(str(e))
        raise


def test_the_exported_page_suggests_what_pytorch_suggests(demo_workdir, static_server, tmp_path):
    """200 held-out prompts, 50 typed key by key into the page (float32 weights) in headless
    Chromium and 150 pasted: its three suggestions, in order, equal `LanguageModel.suggest`'s
    for at least 99% of them;
    each word finished costs the page one step of the model; a tap on a suggestion takes
    it. (int8 weights move near-ties: the demo model's many equally likely jobs and names
    swap places in 5% of these prompts; scripts/bench_keyboard.py measures the keyboard
    recipe's int8 page.)"""
    from selenium.webdriver.common.by import By

    from lstm_lm.inference.keystrokes import held_out_prompts, split_lines

    site, url = static_server
    lm = LanguageModel.load(demo_workdir / "runs" / "demo")
    _export_or_skip(lm, site, int8=False)
    driver = headless_chromium(tmp_path, "800,600")
    try:
        page = Page(driver, url)
        prompts = held_out_prompts(split_lines(lm, "test"), 200)
        shown = [page.type(prompt) for prompt in prompts[:50]] + [page.paste(prompt) for prompt in prompts[50:]]
        same = sum(got == lm.suggest(prompt, 3) for got, prompt in zip(shown, prompts))
        assert same >= 0.99 * len(prompts), f"{same} of {len(prompts)} prompts"

        # one step per word: after a reset (<eos>, one step), three words cost three steps
        page.type("")
        before = len(page.state("timings"))
        page.type("I am from ", clear=False)
        steps = [t["steps"] for t in page.state("timings")[before:]]
        assert sum(steps) == 3, steps
        # a tap takes the first suggestion, and a space after it
        first = driver.find_elements(By.CSS_SELECTOR, ".suggestion")[0]
        word = first.text
        assert [word] == lm.suggest("I am from ", 1)
        first.click()
        page.wait.until(lambda d: page.state("shownFor") == f"I am from {word} ")
    finally:
        driver.quit()


def test_the_exported_page_of_a_character_model_finishes_words_as_pytorch_does(runs, static_server, tmp_path):
    """A character model's page reads each key in one step and searches the word's endings
    as `CharKeyboard` does: the same three suggestions for the tiny corpus's prompts."""
    from lstm_lm.inference.keystrokes import held_out_prompts

    site, url = static_server
    lm = LanguageModel.load(runs["char"])
    _export_or_skip(lm, site)
    driver = headless_chromium(tmp_path, "800,600")
    try:
        page = Page(driver, url)
        lines = (runs["corpus"] / "test.txt").read_text().splitlines()
        prompts = held_out_prompts(lines, 30)
        same = sum(page.type(prompt) == lm.suggest(prompt, 3) for prompt in prompts)
        assert same >= 0.9 * len(prompts), f"{same} of {len(prompts)} prompts"
        page.type("")
        before = len(page.state("timings"))
        page.type("the c", clear=False)
        assert sum(t["steps"] for t in page.state("timings")[before:]) == len("the c")
    finally:
        driver.quit()


def test_torch_and_the_step_graph_agree_on_every_state_layout(lm, tmp_path):
    """The graph's state names follow the cells (h and c per layer for the CIFG)."""
    from lstm_lm.inference.export import state_names

    names = state_names(lm.model)
    keyboard.export_step(lm, tmp_path / "s.onnx")
    graph = onnx.load(str(tmp_path / "s.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", *names]
    assert [o.name for o in graph.output] == ["scores", *[f"{n}_out" for n in names]]
    assert names == ["h0", "c0"]


# -- the n-gram peer (scripts/bench_keyboard.py) -------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_keyboard.py"
    spec = importlib.util.spec_from_file_location("bench_keyboard", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_applies_the_same_definition_to_the_peer(lm, runs, bench):
    """Fed the model's own suggestions, the peer's simulation gives the model's figures."""

    class Suggests:
        def predict(self, text):
            return lm.suggest(text, 3)

    for line in (runs["corpus"] / "test.txt").read_text().splitlines()[:5]:
        ours = simulate(lm, [line], 3)
        theirs = bench.simulate_presage(Suggests(), [line], 3)
        assert (theirs["keystrokes_with"], theirs["keystrokes_without"]) == (
            ours.keystrokes_with,
            ours.keystrokes_without,
        )
        assert (theirs["top1"], theirs["topk"]) == (round(ours.top1, 4), round(ours.topk, 4))


def test_presage_types_the_tiny_test_text(runs, bench, tmp_path):
    if not bench.presage_available():
        pytest.skip("presage is not installed (Debian: apt-get install presage)")
    config = bench.build_presage(runs["corpus"] / "train.txt", tmp_path, 3)
    presage = bench.Presage(config)
    try:
        assert presage.predict("the ca") and all(w.startswith("ca") for w in presage.predict("the ca"))
        lines = (runs["corpus"] / "test.txt").read_text().splitlines()
        got = bench.simulate_presage(presage, lines, 3)
    finally:
        presage.close()
    assert got["words"] == simulate(LanguageModel.load(runs["word"]), lines, 3).words
    assert 0 < got["savings"] < 1 and got["top1"] <= got["topk"]
    text = tmp_path / "test.txt"
    text.write_text("\n".join(lines) + "\n")
    own = bench.presage_simulator(config, text)
    assert 0 < own["savings"] < 1 and own["kn"] > own["ki"]


def test_exporting_leaves_the_model_in_eval_mode(lm, tmp_path):
    """The exporter restores the exported module's training flag, which reaches the model:
    a model left in training mode would suggest through dropout afterwards."""
    before = lm.suggest("the cat s", 3)
    keyboard.export_step(lm, tmp_path / "s.onnx")
    assert not lm.model.training
    assert lm.suggest("the cat s", 3) == before
