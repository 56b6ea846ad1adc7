"""scripts/bench_scale.py runs end to end, shrunk: every kind of record it promises."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_scale.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The same rows on corpora and vocabularies a thousand times smaller.
    monkeypatch.setattr(module, "SIZES", {"1M": 20_000, "10M": 40_000, "100M": 30_000})
    monkeypatch.setattr(module, "VOCABS", {"10k": 300, "50k": 600, "250k": 1_000})
    monkeypatch.setattr(module, "DATA_VOCAB", 2_000)
    monkeypatch.setattr(module, "EVAL_TOKENS", 400)
    monkeypatch.setattr(module, "RECIPES", {"wikitext-2": (500, 1_000_000)})
    # The recipe's torch.compile costs half a minute on a CPU; the compiled loss is tested elsewhere.
    monkeypatch.setattr("lstm_lm.training.trainer.compile_loss", lambda model, mode: model.training_loss)
    return module


def test_bench_scale_writes_data_softmax_and_training_records(bench, tmp_path, capsys):
    out = tmp_path / "scale.json"
    rc = bench.main(
        [
            "--work",
            str(tmp_path / "work"),
            "--sizes",
            "1M,100M",
            "--vocabs",
            "250k",
            "--recipes",
            "wikitext-2",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    records = json.loads(out.read_text())
    data = {(r["size"], r["cache"], r["words_in"]): r for r in records if r["kind"] == "data"}
    assert set(data) == {
        ("1M", "cold", "python"),
        ("1M", "warm", "python"),
        ("1M", "cold", "tokenizers"),
        ("100M", "cold", "python"),
        ("100M", "warm", "python"),
    }
    for r in data.values():
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["vocab"] > 100
    python, tokenizers = data["1M", "cold", "python"], data["1M", "cold", "tokenizers"]
    assert python["train_tokens"] > 18_000  # the words and their lines' <eos>
    assert (python["train_tokens"], python["vocab"]) == (tokenizers["train_tokens"], tokenizers["vocab"])
    soft = {(r["softmax"], r["what"]): r for r in records if r["kind"] == "softmax"}
    assert set(soft) == {(s, w) for s in ("full", "adaptive") for w in ("train", "eval")}
    assert all(r["tokens_per_s"] > 0 and len(r["rounds"]) == 2 for r in soft.values())
    assert soft["adaptive", "train"]["parameters"] != soft["full", "train"]["parameters"]
    (recipe,) = [r for r in records if r["kind"] == "recipe"]
    assert recipe["recipe"] == "wikitext-2" and recipe["compile"] and recipe["vocab"] == 500
    assert recipe["epoch_hours"] == pytest.approx(1e6 / recipe["train_tokens_per_s"] / 3600, abs=1e-3)
    (train,) = [r for r in records if r["kind"] == "train-memory"]
    assert 0 < train["first_step_s"] and train["peak_rss_mb"] > train["model_mb"] > 0
    table = capsys.readouterr().err
    assert (
        "| corpus | cache |" in table
        and "| vocabulary | softmax |" in table
        and "| recipe |" in table
        and "first step" in table
    )


def test_bench_scale_refuses_unknown_sizes(bench):
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "3M"])
    with pytest.raises(SystemExit):
        bench.main(["--recipes", "wikitext-3"])
