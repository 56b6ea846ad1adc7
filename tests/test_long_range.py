"""Why the LSTM exists: every cell through every command, the long-range experiment,
gate inspection, gradient flow and the pictures."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sets, write_tiny_corpus
from typer.testing import CliRunner

from lstm_lm import cells, plots
from lstm_lm.checkpoint import load_checkpoint
from lstm_lm.cli import app
from lstm_lm.config import ModelConfig
from lstm_lm.experiment import Budget, language_accuracy, matched_hidden_size, probe_sentences
from lstm_lm.inference.inspection import gradient_flow
from lstm_lm.model import LSTMLanguageModel

CELLS = cells.names()

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_readable_png(path, min_size=(300, 200)):
    """A real PNG that matplotlib reads back, with something drawn on it."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = pytest.importorskip("matplotlib.pyplot").imread(path)
    height, width = image.shape[:2]
    assert width >= min_size[0] and height >= min_size[1]
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model of each cell, trained for a few steps with --log-grad-flow."""
    root = tmp_path_factory.mktemp("cells")
    data = write_tiny_corpus(root / "data")
    runs = {}
    for cell in CELLS:
        out = root / cell
        result = _run(
            "train",
            "--data",
            data,
            "--cell",
            cell,
            "--out",
            out,
            "--log-grad-flow",
            *tiny_sets(data, "train.log_interval=4"),
        )
        assert result.exit_code == 0, result.output
        runs[cell] = out
    return runs


@pytest.mark.parametrize("cell", CELLS)
def test_every_command_works_with_every_cell(trained, cell, tmp_path):
    run = trained[cell]
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["model"]["cell"] == cell
    result = _run("complete", "the cat sat on the", "--checkpoint", run, "--words", 3)
    assert result.exit_code == 0, result.output  # (a tiny model's greedy first word may be <eos>: nothing to print)
    result = _run("complete", "the cat sat on the", "--checkpoint", run, "--next", "--top-k", 3)
    assert result.exit_code == 0 and len(result.stdout.strip().splitlines()) == 3, result.output
    result = _run("eval", "--checkpoint", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"] > 1
    result = _run("train", "--out", run, "--resume", "--epochs", 3)  # resumes with the saved (h,) or (h, c)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("cell", CELLS)
def test_inspect_prints_the_gates_of_each_cell_and_draws_them(trained, cell, tmp_path):
    png = tmp_path / "gates.png"
    result = _run("inspect", "the cat sat on the", "--checkpoint", trained[cell], "--out", png)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    header, rows = lines[0].split(), lines[1:]
    gates = list(cells.get(cell).gate_names)
    assert header[2 : 2 + len(gates)] == gates
    assert ("|c|" in header) == ("c" in cells.get(cell).state_names) and "|h|" in header
    assert [r.split()[1] for r in rows] == ["the", "cat", "sat", "on", "the"]
    for row in rows:  # every mean gate activation is a sigmoid's
        assert all(0 <= float(v) <= 1 for v in row.split()[2 : 2 + len(gates)])
    assert_readable_png(png)


@pytest.mark.parametrize("cell", CELLS)
def test_inspect_swap_shows_where_a_word_is_written(trained, cell, tmp_path):
    result = _run(
        "inspect",
        "the cat sat on the",
        "--checkpoint",
        trained[cell],
        "--swap",
        "cat=dog",
        "--out",
        tmp_path / "swap.png",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    memory = cells.get(cell).memory
    column = lines[0].split().index(f"|{memory}-{memory}'|")
    distances = [float(line.split()[column]) for line in lines[1:6]]
    assert distances[0] == 0 and all(d > 0 for d in distances[1:])  # nothing differs before "cat"
    assert lines[-1].startswith(f"{memory}' is the memory with 'dog' in place of 'cat'")
    assert_readable_png(tmp_path / "swap.png")


def test_inspect_records_the_same_gates_as_the_cell(trained):
    """The traced forget gate is sigmoid of the forget block, recomputed here from the weights."""
    from lstm_lm.checkpoint import load_checkpoint
    from lstm_lm.inference.inspection import trace_prompt

    model, tokenizer, _ = load_checkpoint(trained["lstm"])
    trace = trace_prompt(model, tokenizer, "the cat")
    ids = [tokenizer.token_to_id(w) for w in ("<eos>", "the", "cat")]
    w_ih, w_hh, b_ih, b_hh = (model.rnn.params(0)[n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    h = c = torch.zeros(1, 16)
    forget = []
    for i in ids:
        gates = F.linear(model.embedding.weight[i][None], w_ih, b_ih) + F.linear(h, w_hh, b_hh)
        ig, fg, gg, og = gates.chunk(4, 1)
        c = torch.sigmoid(fg) * c + torch.sigmoid(ig) * torch.tanh(gg)
        h = torch.sigmoid(og) * torch.tanh(c)
        forget.append(torch.sigmoid(fg)[0])
    torch.testing.assert_close(torch.tensor(trace["gates"]["forget"]), torch.stack(forget[1:]).detach())
    torch.testing.assert_close(torch.tensor(trace["states"]["c"][-1]), c[0].detach())


def test_plot_draws_the_curves_and_the_gradient_flow(trained, tmp_path):
    run = trained["rnn"]
    rows = [json.loads(line) for line in (run / "grad_flow.jsonl").read_text().splitlines()]
    assert rows and all(r["cell"] == "rnn" and len(r["grad_norm"]) == 1 and len(r["grad_norm"][0]) == 8 for r in rows)
    assert [r["step"] for r in rows] == [
        json.loads(line)["step"]
        for line in (run / "steps.jsonl").read_text().splitlines()
        if json.loads(line)["step"] % 4 == 0
    ][: len(rows)]
    result = _run("plot", run, "--out", tmp_path / "rnn.png")
    assert result.exit_code == 0, result.output
    assert "valid ppl" in result.stdout and "gradient flow" in result.stdout
    assert_readable_png(tmp_path / "rnn.png", min_size=(900, 300))
    result = _run("plot", run)  # the default place
    assert result.exit_code == 0 and (run / "training.png").is_file()


def test_gradient_flow_is_the_gradient_of_the_last_steps_loss():
    """Its first entry is |dL_T/dh_T| from the decoder alone; it vanishes over the steps
    in a simple RNN with small recurrent weights; an LSTM whose forget gates are open
    keeps it through the cell state."""
    torch.manual_seed(0)
    ids, targets = torch.randint(0, 20, (30, 4)), torch.randint(0, 20, (30, 4))

    def model_of(cell):
        return LSTMLanguageModel(
            ModelConfig(cell=cell, embedding_size=16, hidden_size=16, num_layers=1, dropout=0.0, impl="custom"), 20
        )

    rnn = model_of("rnn")
    with torch.no_grad():
        rnn.rnn.weight_hh_l0.mul_(0.5)
    flow = gradient_flow(rnn, ids, targets, rnn.init_state(4))[0]
    out, _ = rnn.features(ids)
    h_last = out[-1].detach().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(rnn.decoder(h_last), targets[-1]), h_last)
    assert flow[0] == pytest.approx(float(g.norm(dim=1).mean()), rel=1e-5)
    assert len(flow) == 30 and flow[20] < 1e-4 * flow[0]  # vanished

    lstm = model_of("lstm")
    with torch.no_grad():
        lstm.rnn.bias_ih_l0[16:32] = 6.0  # forget gates open: the cell state carries on
    flow = gradient_flow(lstm, ids, targets, lstm.init_state(4))[0]
    assert flow[20] > 1e-2 * flow[0]
    assert rnn.training and lstm.training  # put back as found


def test_matched_hidden_sizes_give_each_cell_the_lstms_parameter_count():
    budget = Budget(lstm_hidden=128, embedding_size=64)
    counts = {}
    for cell in CELLS:
        hidden = matched_hidden_size(cell, budget, vocab_size=223)
        cfg = ModelConfig(cell=cell, embedding_size=64, hidden_size=hidden, num_layers=1, tie_weights=False)
        counts[cell] = LSTMLanguageModel(cfg, 223).num_parameters()
    assert matched_hidden_size("lstm", budget, 223) == 128
    assert max(counts.values()) / min(counts.values()) < 1.02, counts  # sizes in steps of 4 for cells with heads


def test_probes_have_the_exact_gap_and_batched_accuracy_equals_one_by_one(trained):
    from lstm_lm.checkpoint import load_checkpoint
    from lstm_lm.demo import REGION_LANGUAGE, gap_of
    from lstm_lm.inference.sample import next_words

    pairs = probe_sentences(7, 40, seed=0)
    assert all(gap_of(f"{prompt} {language}.") == 7 for prompt, language in pairs)
    assert all(prompt.endswith("I speak") and language in REGION_LANGUAGE.values() for prompt, language in pairs)
    assert probe_sentences(7, 40, seed=0) == pairs and probe_sentences(7, 40, seed=1) != pairs
    # A model of another corpus, read with its own vocabulary: what matters is that the
    # batched count equals asking one prompt at a time.
    model, tokenizer, _ = load_checkpoint(trained["gru"])
    words = [
        ("the cat sat on the", "mat"),
        ("the dog sat on the", "log"),
        ("a bird sat on the", "mat"),
        ("the cat met the", "dog"),
        ("the dog", "sat"),
    ]
    one_by_one = sum(next_words(model, tokenizer, p, k=1)[0][0] == a for p, a in words) / len(words)
    assert language_accuracy(model, tokenizer, words) == pytest.approx(one_by_one)


def test_long_range_experiment_on_a_tiny_budget(tmp_path):
    out = tmp_path / "exp"
    result = _run(
        "experiment",
        "long-range",
        "--gaps",
        "3,0",
        "--steps",
        15,
        "--probes",
        12,
        "--demo-size",
        400,
        "--hidden",
        16,
        "--out",
        out,
    )  # every cell
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["gaps"] == [0, 3] and tuple(results["cells"]) == CELLS
    for name, r in results["cells"].items():
        assert r["steps"] == 15 and set(r["accuracy"]) == {"0", "3"}
        assert load_checkpoint(out / "runs" / name)[2].train.stop_diverged is False  # a diverged cell gets its row
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert round(r["accuracy"]["0"] * 12) == pytest.approx(r["accuracy"]["0"] * 12)  # a count of 12 probes
    params = [r["parameters"] for r in results["cells"].values()]
    assert max(params) / min(params) < 1.06  # at 16 units, one unit more or less is 1-3% of a cell (4 with heads)
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "cell,hidden_size,parameters,gap_0,gap_3" and len(csv_rows) == 1 + len(CELLS)
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["cell", "units", "params"] and [r.split()[0] for r in table[1:]] == list(CELLS)
    assert_readable_png(out / "accuracy_vs_gap.png")
    assert (out / "runs" / "lstm" / "best" / "model.safetensors").is_file()


def test_without_matplotlib_the_tables_come_with_a_hint(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    result = _run("inspect", "the cat", "--checkpoint", trained["lstm"], "--out", tmp_path / "g.png")
    assert result.exit_code == 0 and "forget" in result.stdout
    assert "pip install 'lstm-lm[plot]'" in result.stderr and not (tmp_path / "g.png").exists()
    result = _run("plot", trained["lstm"], "--out", tmp_path / "p.png")
    assert result.exit_code == 0 and "valid ppl" in result.stdout and "lstm-lm[plot]" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "the cat", "--checkpoint", "{tmp}/nothing"], "no checkpoint"),
        (["inspect", "the cat", "--checkpoint", "{lstm}", "--layer", "2"], "--layer must be between 1 and 1"),
        (["inspect", "   ", "--checkpoint", "{lstm}"], "the prompt is empty"),
        (["inspect", "the cat", "--checkpoint", "{lstm}", "--out", "{tmp}/gates.jpg"], "ending in .png"),
        (["inspect", "the cat", "--checkpoint", "{lstm}", "--swap", "cat"], "--swap: expected WORD=OTHER"),
        (
            ["inspect", "the cat", "--checkpoint", "{lstm}", "--swap", "bird=dog"],
            "'bird' is not one of the prompt's tokens",
        ),
        (
            ["inspect", "the cat", "--checkpoint", "{lstm}", "--swap", "cat=zebra"],
            "'zebra' is not in the model's vocabulary",
        ),
        (["plot", "{tmp}/nothing"], "is not a directory"),
        (["plot", "{tmp}"], "no metrics.jsonl"),
        (["experiment", "long-range", "--gaps", "0,ten"], "--gaps: expected whole numbers"),
        (["experiment", "long-range", "--gaps", "0,-5"], "--gaps: each gap must be between 0 and 500"),
        (["experiment", "long-range", "--cells", "lstm,transformer"], "--cells: transformer unknown"),
        (["experiment", "long-range", "--steps", "0"], "'--steps': Input should be greater than or equal to 1"),
        (["experiment", "long-range", "--device", "tpu"], "--device: must be"),
    ],
)
def test_bad_inputs_give_one_error_line(trained, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, lstm=trained["lstm"]) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output


def test_a_damaged_log_is_one_error_line(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["gru"], run, symlinks=True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    result = _run("plot", run)
    assert result.exit_code == 1 and "not JSON" in result.stderr
