"""Data-parallel training with torchrun: 2 CPU processes (gloo) on tiny data.

Each test starts `torchrun --nproc-per-node 2 -m lstm_lm train ...` as a subprocess and
compares it with a single-process run of the same global batch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, tiny_overrides, tiny_sets, write_tiny_corpus
from typer.testing import CliRunner

from lstm_lm.cli import app
from lstm_lm.config import load_config
from lstm_lm.errors import ConfigError
from lstm_lm.training.distributed import World
from lstm_lm.training.rundir import step_checkpoints
from lstm_lm.training.runlogs import METRICS, STEPS
from lstm_lm.training.train import train

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo, POSIX here")

# fp32 and no dropout: the 2-process run must then follow the 1-process one step by step.
EXACT = ["train.precision=fp32", "train.log_interval=1", "train.epochs=2"]


def _torchrun(corpus: Path, run: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lstm_lm",
        "train",
        "--data",
        str(corpus),
        "--out",
        str(run),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=run.parent, timeout=120)


def _losses(run: Path, name: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / name).read_text().splitlines())}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    corpus = write_tiny_corpus(root / "tiny")
    run = root / "two"
    result = _torchrun(corpus, run, *tiny_sets(corpus, *EXACT))
    assert result.returncode == 0, result.stderr
    return root, corpus, run, result


def test_two_processes_take_the_same_steps_as_one_with_the_same_global_batch(two_process_run):
    root, corpus, run, _ = two_process_run
    single = root / "one"
    train(load_config(None, tiny_overrides(corpus) + EXACT), single)
    one, two = _losses(single, STEPS, "loss"), _losses(run, STEPS, "loss")
    assert sorted(one) == sorted(two) and len(one) > 50
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    v1, v2 = _losses(single, METRICS, "val_loss"), _losses(run, METRICS, "val_loss")
    assert sorted(v1) == sorted(v2)
    for step in v1:  # validation is split over the ranks and summed
        assert v2[step] == pytest.approx(v1[step], abs=1e-5)


def test_two_processes_write_one_checkpoint_that_eval_and_complete_load(two_process_run, monkeypatch):
    root, _, run, result = two_process_run
    assert len(result.stdout.strip().splitlines()) == 1  # one summary, from rank 0
    summary = json.loads(result.stdout)
    assert summary["steps"] == 58 and summary["test_perplexity"] < 13
    assert result.stderr.count("epoch 1 |") == 1  # rank 0 alone logs
    names = [d.name for d in step_checkpoints(run)]
    assert names == sorted(set(names)) and not [d for d in (run / "checkpoints").iterdir() if d.name.startswith(".")]
    assert len((run / METRICS).read_text().splitlines()) == 2
    monkeypatch.chdir(root)
    runner = CliRunner()
    evaluated = runner.invoke(app, ["eval", "--checkpoint", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["perplexity"] == pytest.approx(summary["test_perplexity"], rel=1e-4)
    completed = runner.invoke(app, ["complete", "the cat", "--checkpoint", str(run)])
    assert completed.exit_code == 0 and completed.stdout.strip()


def test_a_stopped_two_process_run_resumes_on_the_same_curve(two_process_run):
    """Dropout on: each rank's own dropout stream must come back from the checkpoint; and
    a GRU, whose saved state is h alone, gathered from both ranks and shared out again."""
    root, corpus, _, _ = two_process_run
    opts = [*EXACT, "model.dropout=0.3", "train.schedule=constant", "model.cell=gru"]
    whole, parts = root / "whole", root / "parts"
    assert _torchrun(corpus, whole, *tiny_sets(corpus, *opts)).returncode == 0
    first = _torchrun(corpus, parts, *tiny_sets(corpus, *opts, "train.max_steps=20"))
    assert first.returncode == 0, first.stderr
    rest = _torchrun(corpus, parts, "--resume", "--set", "train.max_steps=null")
    assert rest.returncode == 0, rest.stderr
    expected, got = _losses(whole, STEPS, "loss"), _losses(parts, STEPS, "loss")
    assert sorted(got) == sorted(expected)
    assert all(got[s] == pytest.approx(expected[s], abs=1e-6) for s in expected)


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ConfigError, match="multiple of 2"):
        World(rank=1, size=2, enabled=True).share(5, "train.batch_size")
    assert World(rank=1, size=2, enabled=True).share(4, "train.batch_size") == slice(2, 4)


def test_the_custom_cell_tied_weights_and_nt_asgd_under_two_processes(two_process_run):
    """The hand-written cell, one weight shared by embedding and output, and NT-ASGD's
    averaged weights (it triggers in epoch 5 here): the same as in one process."""
    root, corpus, _, _ = two_process_run
    opts = [
        *EXACT,
        "model.impl=custom",
        "model.tie_weights=true",
        "train.optimizer=sgd",
        "train.lr=3",
        "train.nt_asgd=true",
        "train.nonmono=1",
        "train.schedule=constant",
        "train.epochs=6",
    ]
    two = root / "awd-two"
    result = _torchrun(corpus, two, *tiny_sets(corpus, *opts))
    assert result.returncode == 0, result.stderr
    one = root / "awd-one"
    train(load_config(None, tiny_overrides(corpus) + opts), one)
    records = [[json.loads(x) for x in (run / METRICS).read_text().splitlines()] for run in (one, two)]
    assert [r["averaged"] for r in records[0]] == [r["averaged"] for r in records[1]]
    assert records[0][-1]["averaged"]  # averaging did start
    for a, b in zip(*records):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
    l1, l2 = _losses(one, STEPS, "loss"), _losses(two, STEPS, "loss")
    assert all(l2[s] == pytest.approx(l1[s], abs=1e-4) for s in l1)


# A process in a group of one: the environment torchrun would give it, then train(), then the
# names of the threads the process still has (Linux's /proc).
_ONE_RANK = """
import json, os, sys
from lstm_lm.config import load_config
from lstm_lm.training.train import train
train(load_config(None, json.loads(sys.argv[1])), sys.argv[2])
print(json.dumps(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_train_leaves_no_gloo_thread_behind(tmp_path):
    # A gloo worker still alive when Python shuts down aborts the process as it frees a finished
    # collective's tensors, after a run that finished and saved; train() must leave none.
    corpus = write_tiny_corpus(tmp_path / "tiny")
    env = dict(
        os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    overrides = json.dumps(tiny_overrides(corpus) + ["train.epochs=1"])
    result = subprocess.run(
        [sys.executable, "-c", _ONE_RANK, overrides, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    threads = json.loads(result.stdout.splitlines()[-1])
    assert not [t for t in threads if "gloo" in t], threads
