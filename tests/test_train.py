"""Training on tiny data: it learns, keeps the best model, logs metrics and resumes exactly."""

import json
import time

import pytest
import torch
from conftest import TINY_TEST, TINY_TRAIN, TINY_VALID, tiny_overrides
from safetensors.torch import load_file

from lstm_lm.checkpoint import load_checkpoint, resolve_checkpoint
from lstm_lm.config import load_config
from lstm_lm.errors import ConfigError, DataError, TrainingError
from lstm_lm.training.clock import Clock
from lstm_lm.training.rundir import last_checkpoint
from lstm_lm.training.train import train


def _cfg(corpus, *extra):
    return load_config(None, tiny_overrides(corpus) + list(extra))


def test_training_learns_and_writes_a_run_directory(tiny_corpus, tmp_path):
    run = tmp_path / "runs" / "tiny"
    summary = train(_cfg(tiny_corpus, "train.epochs=3"), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["val_ppl"] < records[0]["val_ppl"] < 13  # vocab 13: ppl 13 is chance
    assert records[-1]["val_ppl"] < 4
    assert summary["best_valid_perplexity"] == pytest.approx(min(r["val_ppl"] for r in records))
    assert summary["test_perplexity"] is not None and summary["steps"] == records[-1]["step"]
    assert summary["ended_by"] == "epochs"
    assert sorted(p.name for p in run.iterdir()) == [
        ".lstm-lm-run",
        "best",
        "checkpoints",
        "metrics.jsonl",
        "steps.jsonl",
    ]
    assert sorted(p.name for p in resolve_checkpoint(run).iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_state.safetensors",
    ]
    latest = tmp_path / "runs" / "latest"
    assert latest.resolve() == run.resolve()
    # steps.jsonl: each line's own tokens/s, and the epoch's mean so far; the two are the
    # same on an epoch's first line, which covers the same steps
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    firsts = [r for i, r in enumerate(steps) if i == 0 or steps[i - 1]["epoch"] != r["epoch"]]
    assert len(firsts) == 3 and all(r["tokens_per_s"] > 0 for r in steps)
    for r in firsts:
        assert r["tokens_per_s"] == pytest.approx(r["epoch_tokens_per_s"], rel=1e-9)


def test_learning_rate_is_divided_when_validation_stops_improving(tiny_corpus, tmp_path, monkeypatch):
    import lstm_lm.training.trainer as train_mod

    scripted = iter([3.0, 2.0, 2.5, 1.5, 1.6, 1.7, 1.0])  # validation losses, epoch by epoch
    real_evaluate = train_mod.evaluate

    def fake_evaluate(model, data, bptt, *args):
        out = real_evaluate(model, data, bptt, *args)
        return out | {"loss": next(scripted, out["loss"])}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    run = tmp_path / "r"
    train(_cfg(tiny_corpus, "train.optimizer=sgd", "train.lr=8", "train.epochs=7"), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["best"] for r in records] == [True, True, False, True, False, False, True]
    assert [r["lr"] for r in records] == [8, 8, 8, 2, 2, 0.5, 0.125]


def test_diverging_run_stops_without_saving_nan_weights(tiny_corpus, tmp_path, monkeypatch):
    from lstm_lm.model import LSTMLanguageModel

    real_loss, calls = LSTMLanguageModel.training_loss, []

    def exploding_loss(self, *args, **kwargs):  # the 40th training step (in epoch 2) goes to NaN
        objective, loss, state = real_loss(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 40:
            objective, loss = objective * float("nan"), loss * float("nan")
        return objective, loss, state

    monkeypatch.setattr(LSTMLanguageModel, "training_loss", exploding_loss)
    run = tmp_path / "r"
    with pytest.raises(TrainingError, match="not a finite number at step 40 .*epoch 2.*last good checkpoint"):
        train(_cfg(tiny_corpus, "train.epochs=3"), run)
    model, _, _ = load_checkpoint(run)  # the epoch-1 checkpoint is still there, and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_max_steps_stops_mid_epoch(tiny_corpus, tmp_path):
    summary = train(_cfg(tiny_corpus, "train.max_steps=5"), tmp_path / "r")
    assert summary["steps"] == 5 and summary["ended_by"] == "max_steps"


AWD_OPTIONS = (
    "model.weight_drop=0.3",
    "model.locked_dropout=true",
    "model.dropout_embedding=0.1",
    "train.variable_bptt=true",
    "train.nt_asgd=true",
    "train.nonmono=1",
    "train.ar=1",
    "train.tar=1",
    "train.schedule=constant",
)


@pytest.mark.parametrize(
    "optimizer, dropout, options",
    [
        ("adamw", "0.0", ()),
        ("sgd", "0.3", ()),
        ("sgd", "0.3", AWD_OPTIONS),
    ],
)
def test_resume_continues_the_same_run(tiny_corpus, tmp_path, optimizer, dropout, options):
    """Stopped after 7 steps (mid-epoch) and resumed = never stopped: same weights, same losses."""
    extra = [f"train.optimizer={optimizer}", f"model.dropout={dropout}", "train.epochs=3", "train.lr=0.5", *options]
    if optimizer == "adamw":
        extra[3] = "train.lr=0.01"
    whole = tmp_path / "whole"
    train(_cfg(tiny_corpus, *extra), whole)

    parts = tmp_path / "parts"
    train(_cfg(tiny_corpus, *extra, "train.max_steps=7"), parts)
    # The rest of the run, as `lstm-lm train --out parts --resume` does it: the run's own config.
    train(_cfg(tiny_corpus, *extra), parts, resume=True)

    a = load_file(str(last_checkpoint(whole) / "training_state.safetensors"))
    b = load_file(str(last_checkpoint(parts) / "training_state.safetensors"))
    for key in a:
        if key.startswith(("model.", "optim.", "extra.")):
            assert torch.equal(a[key], b[key]), key
    rec_a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    rec_b = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    rec_b = [r for r in rec_b if r["complete_epoch"]]  # drop the record of the stop at step 7
    assert [r["val_loss"] for r in rec_a] == [r["val_loss"] for r in rec_b]
    for ra, rb in zip(rec_a, rec_b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-6)


def test_resume_with_nothing_left_to_do_says_so(tiny_corpus, tmp_path):
    train(_cfg(tiny_corpus, "train.epochs=1"), tmp_path / "r")
    with pytest.raises(ConfigError, match="raise --epochs"):
        train(_cfg(tiny_corpus, "train.epochs=1"), tmp_path / "r", resume=True)


def test_corpus_smaller_than_a_batch_is_refused(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.txt").write_text("one two\n")
    with pytest.raises(DataError, match="fewer than one batch"):
        train(_cfg(d, "train.batch_size=64"), tmp_path / "r")


def test_bf16_training_learns_as_well_as_float32(tiny_corpus, tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        summary = train(_cfg(tiny_corpus, "train.epochs=3", f"train.precision={precision}"), tmp_path / precision)
        results[precision] = summary["best_valid_perplexity"]
        assert (
            json.loads((resolve_checkpoint(tmp_path / precision) / "config.json").read_text())["train"]["precision"]
            == precision
        )
    assert results["bf16"] < 4 and results["fp32"] < 4
    assert results["bf16"] == pytest.approx(results["fp32"], rel=0.05)
    assert results["bf16"] != results["fp32"]  # bf16 really ran


def test_compiled_training_gives_the_eager_losses(tiny_corpus, tmp_path, capfd):
    extra = ["model.impl=custom", "train.max_steps=12", "train.precision=fp32", "train.epochs=1"]
    eager = train(_cfg(tiny_corpus, *extra), tmp_path / "eager")
    compiled = train(_cfg(tiny_corpus, *extra, "train.compile=true"), tmp_path / "compiled")
    assert "compiled the model in" in capfd.readouterr().err
    assert compiled["best_valid_loss"] == pytest.approx(eager["best_valid_loss"], abs=1e-4)
    model, _, cfg = load_checkpoint(tmp_path / "compiled")  # a plain checkpoint: same names as any other
    assert cfg.train.compile is True and not any("_orig_mod" in k for k in model.state_dict())


def test_nt_asgd_evaluates_and_saves_the_averaged_weights(tiny_corpus, tmp_path, monkeypatch):
    import lstm_lm.training.trainer as train_mod

    # Validation losses, epoch by epoch: with nonmono=1, epoch 4's 2.6 is worse than the
    # best before the last epoch (2.0), so averaging starts there; epoch 5 is the best.
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    real_evaluate = train_mod.evaluate
    evaluated = []

    def fake_evaluate(model, data, bptt, *args):
        evaluated.append(model.embedding.weight.detach().clone())
        out = real_evaluate(model, data, bptt, *args)
        return out | {"loss": next(scripted, out["loss"])}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    run = tmp_path / "r"
    train(
        _cfg(
            tiny_corpus,
            "train.optimizer=sgd",
            "train.lr=0.5",
            "train.epochs=5",
            "train.nt_asgd=true",
            "train.nonmono=1",
            "train.schedule=constant",
        ),
        run,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["averaged"] for r in records] == [False, False, False, False, True]
    assert [r["lr"] for r in records] == [0.5] * 5  # no plateau decay while averaging

    state = load_file(str(last_checkpoint(run) / "training_state.safetensors"))
    saved = load_file(str(resolve_checkpoint(run) / "model.safetensors"))
    # Epoch 5 validated and saved the average of epoch 5's iterates, not the last weights.
    assert torch.equal(evaluated[4], state["extra.average.0"])
    for i, (name, _) in enumerate(load_checkpoint(run)[0].named_parameters()):
        assert torch.equal(saved[name], state[f"extra.average.{i}"]), name
    assert not torch.equal(saved["embedding.weight"], state["model.embedding.weight"])


def test_time_budget_ends_the_run_inside_it_with_a_validation_and_a_test(tiny_corpus, tmp_path):
    budget_s = 4.0
    summary = train(
        _cfg(
            tiny_corpus,
            "train.epochs=100000",
            f"train.time_budget={budget_s / 60}",
            "train.schedule=cosine",
            "train.optimizer=sgd",
            "train.lr=1.0",
        ),
        tmp_path / "r",
    )
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) > 3 and summary["test_perplexity"] is not None
    assert records[-1]["elapsed_s"] <= budget_s
    assert summary["wall_s"] <= budget_s + 1.0  # the reserve for the test can be off by a little
    assert summary["ended_by"] == "time_budget"
    lrs = [r["lr"] for r in records]  # the cosine follows the clock: down from 1 to near 0
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.15


def test_a_budget_shorter_than_an_epoch_still_keeps_time_for_the_final_evaluation(tmp_path):
    # Before the first validation the reserve comes from the training speed; here the
    # validation and test are a good share of the budget, so without it the run overshoots.
    d = tmp_path / "big"
    d.mkdir()
    # 600 copies: about 17,000 steps, more than 8 s of this model even on a fast moment of the machine
    for name, lines in (("train", TINY_TRAIN * 600), ("valid", TINY_VALID * 150), ("test", TINY_TEST * 150)):
        (d / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    budget_s = 8.0  # the machine's speed drifts: room for a slow moment, still short of an epoch
    summary = train(
        _cfg(d, "train.epochs=1", f"train.time_budget={budget_s / 60}", "train.log_interval=5"), tmp_path / "r"
    )
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and not records[0]["complete_epoch"]  # stopped inside epoch 1
    assert summary["test_perplexity"] is not None
    assert summary["wall_s"] <= budget_s + 0.5


def test_a_budget_too_short_to_train_at_all_is_one_clear_error(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="leave no time to train"):
        train(_cfg(tiny_corpus, "train.time_budget=0.0001"), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_clock_keeps_the_timed_evaluation_free_and_plans_the_schedule_without_it():
    clock = Clock(1.0, elapsed_before=10.0, start=time.perf_counter())
    clock.time_reserve(seconds=2.0, tokens=1_000, eval_tokens=5_000)  # 10 s for 5x the tokens, +20%, +1 s
    assert clock.reserve_s == pytest.approx(13.0)
    assert clock.progress() == pytest.approx(10.0 / 47.0, abs=1e-3)
    assert not clock.out_of_time()
    clock.before = 47.0
    assert clock.out_of_time()


def test_cosine_over_epochs_anneals_to_min_lr(tiny_corpus, tmp_path):
    train(
        _cfg(
            tiny_corpus,
            "train.epochs=4",
            "train.schedule=cosine",
            "train.optimizer=sgd",
            "train.lr=1.0",
            "train.min_lr=0.1",
            "train.warmup_steps=3",
        ),
        tmp_path / "r",
    )
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] < 1.0 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.02)


def test_stop_lr_ends_the_run_once_the_decays_take_the_rate_below_it(tiny_corpus, tmp_path):
    """lr 1 divided by 10 after every epoch, stop_lr 0.05: epochs at 1 and 0.1, then 0.01 ends it;
    the best model is tested as at any end, a resume has nothing left to do, and one
    without stop_lr trains on."""
    sets = ["train.epochs=6", "train.schedule=exponential", "train.optimizer=sgd", "train.lr=1.0"]
    sets += ["train.lr_decay=10", "train.stop_lr=0.05"]
    summary = train(_cfg(tiny_corpus, *sets), tmp_path / "r")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1.0, 0.1])
    assert summary["epochs"] == 2 and summary["test_perplexity"] > 1 and summary["ended_by"] == "stop_lr"
    again = train(_cfg(tiny_corpus, *sets), tmp_path / "r", resume=True)
    assert again["steps"] == summary["steps"]
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2
    more = train(_cfg(tiny_corpus, *sets[:-1], "train.epochs=3"), tmp_path / "r", resume=True)  # stop_lr unset
    assert more["epochs"] == 3 and more["steps"] > summary["steps"] and more["ended_by"] == "epochs"


def test_variable_bptt_draws_lengths_around_bptt_and_covers_each_epoch(tiny_corpus, tmp_path):
    from lstm_lm.config import TrainConfig
    from lstm_lm.training.trainer import chunk_length

    t = TrainConfig(bptt=35, variable_bptt=True)
    lengths = [chunk_length(t, step) for step in range(4000)]
    assert lengths == [chunk_length(t, step) for step in range(4000)]  # a function of (seed, step)
    assert min(lengths) >= 5 and 33 < sum(lengths) / len(lengths) < 35  # a few halves pull the mean down
    assert len(set(lengths)) > 15 and sum(n < 25 for n in lengths) > 100
    assert chunk_length(TrainConfig(bptt=35), 7) == 35

    fixed = train(_cfg(tiny_corpus, "train.epochs=2"), tmp_path / "fixed")
    varied = train(_cfg(tiny_corpus, "train.epochs=2", "train.variable_bptt=true"), tmp_path / "varied")
    assert varied["epochs"] == fixed["epochs"] == 2 and varied["steps"] != fixed["steps"]
    assert varied["test_perplexity"] < 13


def test_exponential_schedule_divides_after_every_epoch_from_decay_start(tiny_corpus, tmp_path):
    train(
        _cfg(
            tiny_corpus,
            "train.epochs=5",
            "train.schedule=exponential",
            "train.optimizer=sgd",
            "train.lr=1.0",
            "train.lr_decay=2",
            "train.decay_start=2",
        ),
        tmp_path / "r",
    )
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1.0, 1.0, 0.5, 0.25, 0.125]


def test_tensorboard_logger_writes_the_same_records_as_the_jsonl_logs(tiny_corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    train(_cfg(tiny_corpus, "train.logger=tensorboard", "train.log_interval=5", "train.max_steps=20"), run)
    train(
        _cfg(tiny_corpus, "train.logger=tensorboard", "train.log_interval=5", "train.max_steps=40"), run, resume=True
    )  # the resumed run appends to the same event files' history
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps] == [5, 10, 15, 20, 25, 29, 30, 35, 40]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in steps])
    valid = events.Scalars("valid/loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in valid] == [(r["step"], r["val_loss"]) for r in metrics]


def test_tensorboard_logger_without_tensorboard_is_refused_before_any_work(tiny_corpus, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"lstm-lm\[tensorboard\]"):
        train(_cfg(tiny_corpus, "train.logger=tensorboard"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_plain_loss_path_trains_like_the_fused_one(tiny_corpus, tmp_path):
    """train.loss_impl picks the output layer's path; both give the same run to rounding."""
    runs = {
        impl: train(
            _cfg(
                tiny_corpus,
                "train.max_steps=6",
                "train.log_interval=1",
                f"train.loss_impl={impl}",
                "train.precision=fp32",
            ),
            tmp_path / impl,
        )
        for impl in ("fused", "plain")
    }
    losses = {
        impl: [json.loads(line)["loss"] for line in (tmp_path / impl / "steps.jsonl").read_text().splitlines()]
        for impl in runs
    }
    assert len(losses["fused"]) == 6
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-4)


DIVERGING = ("train.optimizer=sgd", "train.lr=30", "train.clip=1000")  # blows the tiny model up in epoch 1


def test_a_diverged_run_ends_at_its_validation_with_an_error_and_its_logs_kept(tiny_corpus, tmp_path, capsys):
    """SGD at lr 30 with the gradient's norm left almost unclipped diverges in the first
    epoch: the validations inside it (eval_every) warn, the epoch's end ends the run rather
    than train on, and since no validation was better there is nothing to test: one
    `error:` line, exit 1, the run's logs kept."""
    from typer.testing import CliRunner

    from lstm_lm.cli import app

    run = tmp_path / "diverged"
    options = [*tiny_overrides(tiny_corpus)[1:], *DIVERGING, "train.epochs=3", "train.eval_every=10"]
    sets = [a for o in options for a in ("--set", o)]
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_corpus), "--out", str(run), *sets])
    assert result.exit_code == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "--overwrite" in errors[0], result.stderr
    assert "train.warmup_steps" in errors[0] and "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: valid ppl")]
    assert len(warnings) == 3 and ["the run ends here" in w for w in warnings] == [False, False, True], warnings
    assert "(--set train.stop_diverged=false trains on)" in warnings[-1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["complete_epoch"]) for r in records] == [(1, False), (1, False), (1, True)]


def test_a_run_that_diverges_after_learning_tests_its_best_checkpoint(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(_cfg(tiny_corpus, "train.optimizer=sgd", "train.lr=1", "train.epochs=1"), run)
    assert "training has diverged" not in capsys.readouterr().err  # lr 1 learns quietly
    summary = train(_cfg(tiny_corpus, *DIVERGING, "train.epochs=4"), run, resume=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["val_ppl"] > 10 * records[0]["val_ppl"]
    assert summary["best_valid_perplexity"] == pytest.approx(first["best_valid_perplexity"])
    assert summary["test_perplexity"] == pytest.approx(first["test_perplexity"])
    assert "the run ends here" in capsys.readouterr().err and summary["ended_by"] == "diverged"


def test_with_stop_diverged_off_a_diverged_run_warns_at_each_validation_and_trains_on(tiny_corpus, tmp_path, capsys):
    summary = train(_cfg(tiny_corpus, *DIVERGING, "train.stop_diverged=false"), tmp_path / "diverged")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: valid ppl")]
    assert len(warnings) == 2 and all("training has diverged" in w and "train.warmup_steps" in w for w in warnings)
    assert summary["epochs"] == 2 and summary["ended_by"] == "epochs" and "the run ends here" not in warnings[0]
