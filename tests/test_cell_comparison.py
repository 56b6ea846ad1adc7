"""`lstm-lm experiment cells`: equal parameters, equal minutes, a sweep inside them, and the
table, files and picture it writes; `train.eval_every`, which gives its curves their points."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
from conftest import tiny_overrides, tiny_sets, write_tiny_corpus
from test_long_range import assert_readable_png
from typer.testing import CliRunner

from lstm_lm import cells
from lstm_lm.cell_comparison import matched_model, parameter_count, train_command
from lstm_lm.checkpoint import load_checkpoint
from lstm_lm.cli import app
from lstm_lm.config import load_config

runner = CliRunner()
FUSED = "lstm"  # a cell with torch's kernel
SCANNED = "mingru"  # a cell with a parallel scan


@pytest.mark.parametrize("recipe", ["ptb-small", "ptb-cpu-30min", "ptb-awd"])
def test_every_cell_gets_the_recipes_parameter_count(recipe):
    """Within 1% of the recipe's model (10k words), counted without allocating the model;
    with tied weights the embedding follows the size; an LSTMP keeps its projection."""
    base = load_config(recipe, []).model
    target = parameter_count(base, 10_000)
    for name in cells.names():
        model = matched_model(base, name, 10_000, target)
        assert abs(parameter_count(model, 10_000) - target) <= 0.01 * target, name
        assert model.cell == name and model.hidden_sizes is None
        if model.proj_size:
            assert "proj_size" in cells.get(name).options and model.embedding_size == base.embedding_size
        elif base.tie_weights:
            assert model.embedding_size == model.hidden_size
        if "num_heads" in cells.get(name).options:
            assert model.hidden_size % 4 == 0


def test_validation_inside_epochs_with_eval_every(tmp_path):
    from lstm_lm.training.train import train

    data = write_tiny_corpus(tmp_path / "data")
    train(load_config(None, [*tiny_overrides(data), "train.eval_every=7", "train.epochs=2"]), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    inside = [r for r in records if not r["complete_epoch"]]
    assert inside and all(r["step"] % 7 == 0 for r in inside)
    assert [r["epoch"] for r in records if r["complete_epoch"]] == [1, 2]
    assert len({r["lr"] for r in records if r["epoch"] == 1}) == 1  # the learning rate moves at epoch ends only


def test_cells_experiment_on_a_tiny_budget(tmp_path):
    data = write_tiny_corpus(tmp_path / "data")
    out = tmp_path / "cells"
    args = ["experiment", "cells", "--data", str(data), "--cells", f"{FUSED},{SCANNED}", "--minutes", "0.3"]
    args += ["--lr-factors", "0.5,2", "--out", str(out), *tiny_sets(data, "train.epochs=50")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = result.stdout.strip().splitlines()
    assert rows[0].split()[:3] == ["cell", "units", "params"] and [r.split()[0] for r in rows[1:]] == [FUSED, SCANNED]
    results = json.loads((out / "results.json").read_text())
    base_lr = load_config(None, tiny_overrides(data)).train.lr
    for name, r in results["cells"].items():
        assert "failed" not in r, r
        assert abs(r["parameters"] - results["target_parameters"]) <= 0.05 * results["target_parameters"]
        assert set(r["sweep"]) == {f"{base_lr * 0.5:g}", f"{base_lr * 2:g}"} and r["lr"] in (base_lr * 0.5, base_lr * 2)
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["test_top1_accuracy"] <= 1
        assert len(r["curve"]) >= 2 and r["curve"][-1][0] <= 0.3 * 60 + 5  # within its minutes (and a margin)
        assert [p[0] for p in r["curve"]] == sorted(p[0] for p in r["curve"])  # on the cell's one clock
        assert r["valid_perplexity"] == pytest.approx(min(p for _, p in r["curve"]))
        assert r["command"].startswith("lstm-lm train") and f"model.cell={name}" in r["command"]
        steps = [json.loads(x)["step"] for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == len(set(steps))  # the budget's end does not validate a step again
        # a diverged run would train on to the end of its share, as every other cell's does
        assert load_checkpoint(out / "runs" / name)[2].train.stop_diverged is False
    assert (out / "results.csv").read_text().splitlines()[0].startswith("cell,hidden_size,parameters")
    assert_readable_png(out / "valid_vs_time.png")


def test_the_command_of_a_row_repeats_its_run():
    overrides = ["train.compile=false", "model.dropout=0.3"]  # the experiment's own --set
    cfg = load_config("ptb-small", [*overrides, "model.cell=mlstm", "model.num_heads=2", "train.eval_every=100"])
    cmd = train_command(cfg, 2.1, "ptb-small", overrides)
    assert cmd.startswith("lstm-lm train --config ptb-small --data ../shared/data/ptb ")
    for part in ("model.cell=mlstm", "model.num_heads=2", "train.eval_every=100", "train.time_budget=2.10"):
        assert f"--set {part}" in cmd
    args = shlex.split(cmd)
    again = load_config("ptb-small", [args[i + 1] for i, a in enumerate(args) if a == "--set"])
    assert again.model == cfg.model
    assert dataclasses.replace(again.train, time_budget=None) == dataclasses.replace(cfg.train, time_budget=None)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--cells", "lstm,xlstm"], "--cells: xlstm unknown"),
        (["--lr-factors", "1,zero"], "--lr-factors"),
        (["--lr-factors", "0,1"], "--lr-factors"),
        (["--sweep-share", "1.5"], "--sweep-share"),
        (["--set", "model.cell=mlstm", "--set", "model.num_heads=3"], "model.num_heads"),
        (["--config", "no-such-recipe"], "no-such-recipe"),
        (["--data", "no/such/corpus"], "no/such/corpus"),
    ],
)
def test_bad_options_are_one_error_line(args, message, tmp_path):
    result = runner.invoke(app, ["experiment", "cells", "--minutes", "0.1", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_a_run_that_blows_up_does_not_squash_the_others_picture():
    from lstm_lm.plots import perplexity_range

    assert perplexity_range([[400.0, 300.0], [900.0, 700.0]]) is None  # everything fits
    assert perplexity_range([[]]) is None
    bottom, top = perplexity_range([[400.0, 300.0], [2.2e6, 2600.0, 2400.0]])
    assert top == 2 * 2400.0 and bottom == pytest.approx(0.8 * 300.0)  # every curve's best in view


def test_the_comparison_picture_is_drawn_with_a_blown_up_run(tmp_path):
    pytest.importorskip("matplotlib")
    from lstm_lm.plots import plot_cell_comparison

    cell = {"hidden_size": 8, "lr": 10.0, "test_perplexity": 300.0}
    steady, blown, failed = cells.names()[:3]
    results = {
        "corpus": "tiny",
        "target_parameters": 1000,
        "machine": "test",
        "budget": {"minutes": 1.0, "sweep_share": 0.3},
        "cells": {
            steady: cell | {"curve": [[30.0, 400.0], [50.0, 300.0]]},
            blown: cell | {"curve": [[30.0, 2.2e6], [50.0, 2400.0]]},
            failed: {"hidden_size": 8, "failed": "diverged"},
        },
    }
    assert_readable_png(plot_cell_comparison(results, tmp_path / "cells.png"))
