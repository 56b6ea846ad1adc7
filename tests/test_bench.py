"""scripts/bench_speed.py runs end to end on a few rows and writes the records it promises."""

import importlib.util
import json
import signal
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_speed"]


def test_bench_writes_one_record_per_row_with_ratios(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(
        [
            "--sizes",
            "small",
            "--rows",
            "cudnn/fp32,cudnn/bf16,cudnn/fp32/plain-loss,cudnn/fp32/cell=cifg",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--eval-chunks",
            "1",
            "--gen-tokens",
            "5",
            "--skip-complete",
            "--no-peer",
            "--peak-seconds",
            "0.2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"] if r["size"] == "ptb-small"}
    assert set(rows) == {
        "baseline",
        "cudnn/fp32",
        "cudnn/bf16",
        "cudnn/fp32/plain-loss",
        "cudnn/fp32/cell=cifg",
        "generate/fp32",
        "generate/bf16",
    }
    assert rows["baseline"]["ratio_vs_baseline"] == 1.0
    for name in ("baseline", "cudnn/fp32", "cudnn/bf16", "cudnn/fp32/plain-loss", "cudnn/fp32/cell=cifg"):
        r = rows[name]
        assert r["tokens_per_s"] > 0 and r["eval_tokens_per_s"] > 0 and 0 < r["peak_share"]
        assert len(r["step_ms_all"]) == 2  # one median over two rounds
    assert rows["cudnn/bf16"]["precision"] == "bf16" and not rows["cudnn/bf16"]["compile"]
    assert result["peak_flops"]["fp32"] > 0 and result["peak_flops"]["bf16"] > 0
    # the targets that these rows allow are checked, with their figures
    names = [t["target"] for t in result["targets"]]
    assert any("best setting" in n for n in names) and any("generation" in n for n in names)
    table = capsys.readouterr().err
    assert "train tok/s" in table and "baseline" in table and "targets:" in table


def test_bench_refuses_unknown_rows(bench):
    with pytest.raises(SystemExit):
        bench.main(["--rows", "cudnn/fp16"])


def test_bench_refuses_a_peak_of_no_seconds(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--peak-seconds", "0"])
    assert "--peak-seconds: above 0" in capsys.readouterr().err


@pytest.mark.shared_data
def test_bench_runs_the_upstream_example_and_lstm_lm_train_side_by_side(bench):
    """The peer as its own process, and real `lstm-lm train` runs, a few batches each."""
    if not (bench.PEER_DIR / "main.py").is_file() or not (bench.PTB_DIR / "train.txt").is_file():
        pytest.skip("../shared/peer or ../shared/data/ptb is not present")
    records = bench.peer_comparison(["small"], batches=20, interval=10, rounds=1)
    rows = {r["row"]: r for r in records}
    assert set(rows) == {"peer (pytorch/examples)", "lstm-lm train", "lstm-lm train --compile"}
    assert rows["peer (pytorch/examples)"]["ratio_vs_peer"] == 1.0
    for r in records:
        assert r["tokens_per_s"] > 0 and len(r["rounds_ratio_vs_peer"]) == 1


def test_gpu_plan_and_targets(bench):
    """On a GPU the plan adds CUDA-graph rows, and the issue's GPU targets are computed
    from the peer rows (figures made up here: this checks the arithmetic, not a GPU)."""
    import torch

    names = [bench.row_name(*c) for c in bench.plan("small", quick=True, only=None, device="cuda")]
    assert "cudnn/bf16/compile/cudagraphs" in names and "cudnn/fp32/plain-loss" in names
    assert not any("cudagraphs" in bench.row_name(*c) for c in bench.plan("small", quick=False, only=None))
    records = [
        {"size": "ptb-medium", "row": "custom/fp32", "tokens_per_s": 1000.0},
        {"size": "ptb-medium", "row": "cudnn/bf16", "tokens_per_s": 25000.0},
    ]
    for row, tok_s, ratio in (
        ("peer (pytorch/examples)", 100.0, 1.0),
        ("lstm-lm train", 150.0, 1.5),
        ("lstm-lm train --precision fp32", 120.0, 1.2),
        ("lstm-lm train --impl custom --compile", 60.0, 0.6),
    ):
        records.append({"size": "ptb-large", "row": row, "tokens_per_s": tok_s, "ratio_vs_peer": ratio})
    targets = {t["target"]: t for t in bench.check_targets(records, {}, torch.device("cuda"))}
    assert targets["ptb-medium: cudnn/bf16 vs custom/fp32 (eager), same GPU"]["value"] == 25.0
    assert targets["ptb-large: cuDNN, bf16 vs the upstream example, same GPU"]["met"]
    assert not targets["ptb-large: cuDNN, fp32 vs the upstream example, same GPU"]["met"]
    custom = targets["ptb-large: compiled hand-written cell vs cuDNN (lstm-lm train)"]
    assert custom["value"] == pytest.approx(0.4) and not custom["met"]


def test_bench_profile_names_where_each_rows_step_spends_its_time(bench, tmp_path):
    out = tmp_path / "profile.json"
    args = [
        "--profile",
        "--sizes",
        "small",
        "--rows",
        "cudnn/fp32",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    assert bench.main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["row"], r["phase"]) for r in records] == [
        ("baseline", "train"),
        ("baseline", "eval"),
        ("cudnn/fp32", "train"),
        ("cudnn/fp32", "eval"),
    ]
    for r in records:
        shares = [t["share"] for t in r["top"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        assert any(t["op"] in ("aten::mm", "aten::addmm") for t in r["top"])  # the output layer's products


PEER_SCRIPT = SCRIPT.with_name("peer_budget.py")
PEER_MAIN = SCRIPT.parents[2] / "shared" / "peer" / "word_language_model" / "main.py"


def _peer_budget():
    spec = importlib.util.spec_from_file_location("peer_budget", PEER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_corpus(folder):
    """train.txt, valid.txt and test.txt of a few words: epochs of the example take milliseconds."""
    words = "the cat sat on the mat and the dog sat on the log".split()
    for split, lines in (("train", 60), ("valid", 8), ("test", 8)):
        (folder / f"{split}.txt").write_text("\n".join(" ".join(words[i % 5 :]) for i in range(lines)) + "\n")


@pytest.mark.skipif(not PEER_MAIN.is_file(), reason="../shared/peer is not present")
def test_peer_budget_reports_the_examples_epochs_and_test_perplexity(tmp_path, capsys):
    _tiny_corpus(tmp_path)
    extra = ["--epochs", "2", "--emsize", "8", "--nhid", "8", "--bptt", "5", "--batch_size", "4"]
    assert _peer_budget().main(["--data", str(tmp_path), "--minutes", "5", "--", *extra]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["epochs"] == 2  # it finished within the budget, so nothing stopped it
    assert f"test ppl {record['test_ppl']:8.2f}" in captured.err  # the example's own line, passed on to stderr
    assert record["best_valid_ppl"] > 1.0 and record["wall_s"] >= record["training_s"] > 0


@pytest.mark.skipif(not PEER_MAIN.is_file(), reason="../shared/peer is not present")
def test_peer_budget_stops_the_example_at_the_budget_even_from_a_background_job(tmp_path, capsys):
    _tiny_corpus(tmp_path)
    extra = ["--epochs", "100000", "--emsize", "8", "--nhid", "8", "--bptt", "5", "--batch_size", "4"]
    # A shell's background job starts with SIGINT ignored; its children inherit that.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert _peer_budget().main(["--data", str(tmp_path), "--minutes", "0.25", "--", *extra]) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert "Exiting from training early" in captured.err  # the example's own Ctrl-C path
    assert 1 <= record["epochs"] < 100000
    assert record["training_s"] >= 15 and record["wall_s"] >= record["training_s"]


def test_peer_budget_refuses_a_folder_without_the_three_splits(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("a b c\n")
    assert _peer_budget().main(["--data", str(tmp_path), "--minutes", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "test.txt" in err


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rnn_kernel_bench_times_each_width_in_both_precisions_and_the_lstmp_kernels(capsys):
    import torch

    from lstm_lm.utils import native_bf16

    kernel = _load("bench_rnn_kernel")
    tiny = ["--layers", "1", "--bptt", "3", "--batch", "2", "--rounds", "1", "--repeats", "1"]
    kernel.main(["--compare", "lstmp", "--units", "16", "--proj", "4", *tiny])  # on any CPU: both in fp32
    header, row = capsys.readouterr().out.splitlines()[1:]
    assert header.split() == ["units", "aten", "fwd", "aten", "bwd", "ours", "fwd", "ours", "bwd", "ours/aten", "total"]
    assert row.split()[0] == "16" and all(float(v) > 0 for v in row.split()[1:])
    with pytest.raises(SystemExit, match="error: --compare lstmp times an LSTMP"):
        kernel.main(["--compare", "lstmp", "--units", "16", *tiny])
    if not native_bf16(torch.device("cpu")):
        with pytest.raises(SystemExit, match="error: this CPU has no bf16 instructions"):
            kernel.main(["--units", "8", *tiny])
        return
    kernel.main(["--units", "8", "16", *tiny])
    kernel.main(["--units", "16", "--proj", "4", *tiny])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["8", "16", "16"]
    for r in rows:  # fp32 forward, backward, bf16 forward, backward (ms), their ratio
        assert all(float(v) > 0 for v in r[1:]) and len(r) == 6


def test_cells_bench_trains_a_recipes_model_shape_and_refuses_a_cell_it_does_not_fit(tmp_path, capsys):
    cells_bench = _load("bench_cells")
    shape = cells_bench.recipe_shape("ptb-cpu-30min")
    assert (
        shape["proj_size"] == 128 and shape["hidden_size"] == 1000 and (shape["batch_size"], shape["bptt"]) == (20, 35)
    )
    with pytest.raises(SystemExit):
        cells_bench.main(["--config", "ptb-cpu-30min", "--cells", "gru"])  # the GRU has no projection
    assert "no chosen cell reads ['proj_size']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cells_bench.main(["--config", "no-such-recipe"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cells_bench.main(["--config", "demo", "--precision", "fp16"])
    assert "--precision: fp32, bf16 or auto, got 'fp16'" in capsys.readouterr().err

    out = tmp_path / "cells.json"
    cells_bench.main(["--config", "demo", "--cells", "lstm", "--rounds", "1", "--steps", "1", "--json", str(out)])
    assert "demo's model (embedding_size 128, hidden_size 128" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [(r["cell"], r["impl"], r["precision"]) for r in records] == [
        ("lstm", "cudnn", "fp32"),
        ("lstm", "custom", "fp32"),
    ]
    for r in records:  # a training and an evaluation rate for each, and no baseline to compare with
        assert r["train_tokens_per_s"] > 0 and r["eval_tokens_per_s"] > 0
        assert r["train_ratio"] is None and r["eval_ratio"] is None


def test_modern_cells_bench_times_each_form_of_a_chosen_cell_beside_the_lstm(tmp_path, capsys):
    modern = _load("bench_modern_cells")
    with pytest.raises(SystemExit, match="error: --cells takes"):
        modern.main(["--cells", "lstm"])  # the LSTM is the fixed reference row, not a choice
    out = tmp_path / "modern.json"
    modern.main(
        ["--cells", "mingru", "--batch", "2", "--bptt", "3", "--rounds", "1", "--steps", "1", "--json", str(out)]
    )
    table = [
        line.split("|")[1:3]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    chosen = "mingru"
    assert [(c.strip(), f.strip()) for c, f in table[1:]] == [
        ("lstm", "fused kernel"),
        *((chosen, form) for form in ("step by step", "scan", "step loop")),
    ]
    record = json.loads(out.read_text())
    assert record["shape"] == "batch 2, bptt 3" and len(record["rows"]) == 4
    assert all(v > 0 for row in record["rows"] for v in row["speeds"]["step"] + row["speeds"]["layers"])
