"""scripts/reproduce_ptb.sh: trains a recipe and prints one JSON line; bad arguments are one error."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_ptb.sh"
pytestmark = pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "lstm-lm").exists(),
    reason="the script runs .venv/bin/lstm-lm (bash scripts/setup.sh makes it)",
)


def _run(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_prints_one_json_line_with_the_final_perplexities(tiny_corpus, tmp_path):
    config = tmp_path / "tiny-recipe.yaml"
    config.write_text(
        "model: {embedding_size: 16, hidden_size: 16, num_layers: 1, dropout: 0.0}\n"
        "train: {epochs: 2, batch_size: 4, bptt: 8, eval_batch_size: 2, optimizer: adamw, lr: 0.01, device: cpu}\n"
    )
    result = _run(config, tiny_corpus, "--set", "train.precision=fp32", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["config"] == str(config) and out["epochs"] == 2
    assert 1 < out["test_perplexity"] < 13 and 1 < out["valid_perplexity"] < 13  # vocab 13
    assert out["wall_s"] >= out["train_wall_s"] > 0 and out["machine"]


def test_missing_config_or_corpus_is_one_error_line(tmp_path):
    for args in ((tmp_path / "nope.yaml",), (ROOT / "configs" / "ptb-small.yaml", tmp_path / "no-ptb")):
        result = _run(*args)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
