"""The command line end to end with typer's CliRunner: results on stdout, one error line on failure."""

import json
import os
import re

import pytest
from conftest import tiny_sets
from typer.testing import CliRunner

from lstm_lm.checkpoint import load_checkpoint, resolve_checkpoint
from lstm_lm.cli import app
from lstm_lm.demo import SEED_ANSWER, SEED_PROMPT, demo_splits
from lstm_lm.inference.sample import next_words

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tiny_train_args(corpus, out):
    return ["train", "--data", corpus, "--out", out, *tiny_sets(corpus)]


@pytest.fixture
def trained(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/latest lands in the test's own directory
    result = _run(*_tiny_train_args(tiny_corpus, tmp_path / "runs" / "tiny"))
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny", result


def _assert_one_error_line(result):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


def test_train_prints_a_json_summary_on_stdout_and_logs_on_stderr(trained):
    run, result = trained
    summary = json.loads(result.stdout)
    assert summary["run_dir"] == str(run) and summary["best_valid_perplexity"] > 1
    assert "epoch 1" in result.stderr and "epoch 2" in result.stderr


def test_complete_and_next_use_runs_latest(trained):
    result = _run("complete", "the cat sat")
    assert result.exit_code == 0, result.output
    words = result.stdout.split()
    assert 1 <= len(words) <= 20 and "<unk>" not in words
    result = _run("complete", "the cat", "--next", "--top-k", "3")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert len(rows) == 3
    probs = [float(p) for _, p in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_sampling_is_repeatable_with_a_seed(trained):
    a = _run("complete", "the", "--temperature", "1.5", "--seed", "7", "--words", "8")
    b = _run("complete", "the", "--temperature", "1.5", "--seed", "7", "--words", "8")
    assert a.exit_code == 0 and a.stdout == b.stdout
    assert len(a.stdout.split()) <= 8


def test_eval_prints_json(trained):
    run, _ = trained
    result = _run("eval", "--checkpoint", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["split"] == "test" and out["tokens"] > 0 and out["batch_size"] == 2
    assert out["perplexity"] == pytest.approx(2.718281828 ** out["loss"])
    assert 0 < out["top1_accuracy"] <= out["top5_accuracy"] <= 1
    valid = json.loads(_run("eval", "--split", "valid", "--batch-size", "1", "--device", "cpu").stdout)
    assert valid["split"] == "valid" and valid["batch_size"] == 1
    assert "bits_per_char" not in out
    # the run's own precision by default; --precision overrides it, and the two agree closely
    fp32 = json.loads(_run("eval", "--checkpoint", run, "--device", "cpu", "--precision", "fp32").stdout)
    bf16 = json.loads(_run("eval", "--checkpoint", run, "--device", "cpu", "--precision", "bf16").stdout)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.01)


def test_train_precision_and_compile_options_reach_the_config(tiny_corpus, tmp_path):
    out = tmp_path / "r"
    result = _run(*_tiny_train_args(tiny_corpus, out), "--precision", "fp32", "--no-compile", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    assert "precision fp32" in result.stderr
    saved = json.loads((resolve_checkpoint(out) / "config.json").read_text())["train"]
    assert saved["precision"] == "fp32" and saved["compile"] is False


def test_time_budget_option_reaches_the_config_and_bad_values_are_one_error(tiny_corpus, tmp_path):
    out = tmp_path / "r"
    result = _run(*_tiny_train_args(tiny_corpus, out), "--time-budget", "0.05", "--epochs", "1000")
    assert result.exit_code == 0, result.output
    assert json.loads((resolve_checkpoint(out) / "config.json").read_text())["train"]["time_budget"] == 0.05
    assert json.loads(result.stdout)["wall_s"] < 0.05 * 60 + 2
    line = _assert_one_error_line(_run(*_tiny_train_args(tiny_corpus, tmp_path / "s"), "--time-budget", "-1"))
    assert "train.time_budget" in line


def test_an_awd_style_model_trains_completes_and_evaluates(tiny_corpus, tmp_path):
    """Per-layer sizes and every regularizer through the commands: the checkpoint
    round-trips its list-valued config, and complete and eval run on it."""
    out = tmp_path / "awd"
    awd = [
        "model.num_layers=2",
        "model.hidden_sizes=[24, 16]",
        "model.locked_dropout=true",
        "model.dropout_embedding=0.1",
        "model.weight_drop=0.3",
        "train.ar=2",
        "train.tar=1",
        "train.nt_asgd=true",
        "train.optimizer=sgd",
        "train.lr=1",
        "train.variable_bptt=true",
    ]
    args = _tiny_train_args(tiny_corpus, out)
    for item in awd:
        args += ["--set", item]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((resolve_checkpoint(out) / "config.json").read_text())["model"]["hidden_sizes"] == [24, 16]
    completion = _run("complete", "the cat", "--checkpoint", out, "--words", "3")
    assert completion.exit_code == 0 and completion.stdout.strip()
    ev = json.loads(_run("eval", "--checkpoint", out, "--device", "cpu").stdout)
    assert ev["perplexity"] < 13 and ev["top5_accuracy"] >= ev["top1_accuracy"]


def test_eval_on_moved_data_says_to_pass_data(trained, tiny_corpus):
    run, _ = trained
    moved = tiny_corpus.with_name("moved")
    tiny_corpus.rename(moved)
    line = _assert_one_error_line(_run("eval", "--checkpoint", run))
    assert "does not exist" in line and "pass --data" in line
    result = _run("eval", "--checkpoint", run, "--data", moved, "--device", "cpu")
    assert result.exit_code == 0 and json.loads(result.stdout)["tokens"] > 0


def test_char_model_reports_bits_per_char(tiny_corpus, tmp_path):
    out = tmp_path / "char"
    result = _run(*_tiny_train_args(tiny_corpus, out), "--set", "data.tokenizer=char", "--epochs", "1")
    assert result.exit_code == 0, result.output
    ev = json.loads(_run("eval", "--checkpoint", out, "--device", "cpu").stdout)
    assert ev["bits_per_char"] == pytest.approx(ev["loss"] / 0.6931471805599453)
    result = _run("complete", "the c", "--checkpoint", out, "--words", "3")
    assert result.exit_code == 0 and len(result.stdout.split()) <= 3


def test_resume_through_the_cli(trained):
    run, _ = trained
    result = _run("train", "--out", run, "--resume", "--epochs", "3")
    assert result.exit_code == 0, result.output
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_demo_end_to_end_answers_tamil(demo_workdir, monkeypatch):
    """The quickstart: `lstm-lm train` (demo corpus -> runs/demo), then the seed sentence."""
    tmp_path = demo_workdir
    monkeypatch.chdir(tmp_path)
    assert (resolve_checkpoint(tmp_path / "runs" / "demo") / "model.safetensors").is_file()
    result = _run("complete", SEED_PROMPT)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{SEED_ANSWER}."
    top = _run("complete", SEED_PROMPT, "--next", "--top-k", "1").stdout.split("\t")
    assert top[0] == SEED_ANSWER and float(top[1]) > 0.5

    # Beyond the seed sentence: held-out biographies, the language after "I speak".
    model, tokenizer, cfg = load_checkpoint(tmp_path / "runs" / "latest")
    cases = [
        m.groups()
        for line in demo_splits(cfg.data.demo_size, cfg.data.demo_seed)["test"]
        if (m := re.match(r"(.*?\bI speak) (\w+)\.", line))
    ]
    assert len(cases) > 100
    right = sum(next_words(model, tokenizer, prompt, k=1)[0][0] == lang for prompt, lang in cases)
    assert right / len(cases) >= 0.95


HELP_OPTIONS = {
    "train": [
        "--config",
        "--data",
        "--out",
        "--resume",
        "--set",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--bptt",
        "--lr",
        "--device",
        "--seed",
        "--cell",
        "--impl",
        "--precision",
        "--compile",
        "--time-budget",
        "--log-grad-flow",
    ],
    "inspect": ["--checkpoint", "--out", "--layer", "--units", "--top-k", "--swap"],
    "plot": ["--out"],
    "experiment long-range": [
        "--gaps",
        "--cells",
        "--out",
        "--steps",
        "--hidden",
        "--probes",
        "--demo-size",
        "--device",
        "--seed",
    ],
    "complete": ["--checkpoint", "--words", "--next", "--top-k", "--temperature", "--top-p", "--seed"],
    "eval": ["--checkpoint", "--data", "--split", "--batch-size", "--precision"],
    "score": ["--checkpoint", "--per-token", "--device", "--precision"],
    "serve": ["--checkpoint", "--host", "--port", "--device", "--threads"],
    "export": ["--format", "--checkpoint", "--out", "--int8", "--data"],
}


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
def test_help_shows_every_option_and_an_example(command):
    result = runner.invoke(app, [*command.split(), "-h"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in HELP_OPTIONS[command]:
        assert option in result.stdout, option
    assert "Examples" in result.stdout and f"lstm-lm {command}" in result.stdout


def test_top_level_help_lists_commands():
    result = _run("-h")
    assert result.exit_code == 0
    for command in ("train", "complete", "eval"):
        assert command in result.stdout
    assert "Examples" in result.stdout and "lstm-lm complete" in result.stdout


# --- bad input: one `error:` line, exit code 1, no traceback, nothing saved is changed


def test_missing_data_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _assert_one_error_line(_run("train", "--data", tmp_path / "no-such-dir"))
    assert "does not exist" in line
    assert not (tmp_path / "runs").exists()


def test_empty_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in _assert_one_error_line(_run("train", "--data", tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n\n" * 40)
    assert "no tokens" in _assert_one_error_line(_run("train", "--data", tmp_path / "blank.txt"))


def test_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _assert_one_error_line(_run("complete", "hello"))
    assert "no checkpoint at runs/latest" in line and "lstm-lm train" in line
    assert "no checkpoint" in _assert_one_error_line(_run("eval", "--checkpoint", tmp_path / "nope"))


def test_bad_config_values_are_listed_together(tmp_path, monkeypatch, tiny_corpus):
    monkeypatch.chdir(tmp_path)
    line = _assert_one_error_line(
        _run(
            "train",
            "--data",
            tiny_corpus,
            "--set",
            "model.dropout=2",
            "--set",
            "train.optimizer=adam",
            "--lr",
            "-1",
            "--precision",
            "fp16",
        )
    )
    assert "model.dropout" in line and "train.optimizer" in line and "train.lr" in line and "train.precision" in line


def test_bad_prompt_and_options_keep_the_checkpoint(trained):
    run, _ = trained
    before = {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert "empty" in _assert_one_error_line(_run("complete", "   "))
    assert "vocabulary" in _assert_one_error_line(_run("complete", "zzz qqq"))
    assert "--split" in _assert_one_error_line(_run("eval", "--split", "train"))
    assert "--top-p" in _assert_one_error_line(_run("complete", "the", "--top-p", "1.5"))
    assert "--precision" in _assert_one_error_line(_run("eval", "--precision", "fp16"))
    after = {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LSTM_LM_DEBUG", "1")
    result = _run("complete", "hello")
    assert result.exit_code == 1 and result.exception is not None
    assert os.environ["LSTM_LM_DEBUG"] == "1"


def test_a_word_ending_in_a_full_stop_does_not_end_the_sentence(tmp_path, monkeypatch):
    """PTB writes "u.s." as one word; a completion goes on past it to the end of the sentence."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "abbrev"
    d.mkdir()
    text = "\n".join(["the u.s. company said it will buy the firm"] * 60) + "\n"
    for split in ("train", "valid", "test"):
        (d / f"{split}.txt").write_text(text)
    result = _run(*_tiny_train_args(d, tmp_path / "runs" / "abbrev"), "--epochs", "6")
    assert result.exit_code == 0, result.output
    result = _run("complete", "the")
    assert result.stdout.strip() == "u.s. company said it will buy the firm"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu(tmp_path, monkeypatch, tiny_corpus):
    monkeypatch.chdir(tmp_path)
    line = _assert_one_error_line(_run("train", "--data", tiny_corpus, "--device", "cuda"))
    assert "no CUDA device" in line


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_bad_device_name_for_complete(trained, device):
    assert "cuda:N" in _assert_one_error_line(_run("complete", "the", "--device", device))
