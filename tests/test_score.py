"""`lstm-lm score`: one JSON line per input line, from a file or stdin."""

import json

import pytest
from conftest import tiny_sets
from typer.testing import CliRunner

from lstm_lm.cli import app

runner = CliRunner()


@pytest.fixture
def run(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(tiny_corpus), "--out", str(out), *tiny_sets(tiny_corpus)])
    assert result.exit_code == 0, result.output
    return out


def test_one_json_line_per_line_in_order(run, tmp_path):
    lines = ["the cat sat on the mat", "", "mat the on sat cat the", "the zebra sat"]
    f = tmp_path / "s.txt"
    f.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["score", str(f), "--checkpoint", str(run), "--per-token"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == lines
    assert [r["tokens"] for r in rows] == [7, 1, 7, 4]  # the words and the <eos> that ends the line
    assert rows[0]["logprob"] > rows[2]["logprob"]  # a sentence of the corpus beats its words reversed
    assert rows[3]["unknown"] == 1
    for r in rows:
        assert sum(lp for _, lp in r["token_logprobs"]) == pytest.approx(r["logprob"], abs=1e-4)
        assert r["token_logprobs"][-1][0] == "<eos>"


def test_stdin_gives_what_the_file_gives(run, tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("the cat sat\nthe dog sat on the log\n")
    from_file = runner.invoke(app, ["score", str(f), "--checkpoint", str(run)]).stdout
    from_stdin = runner.invoke(app, ["score", "-", "--checkpoint", str(run)], input=f.read_text())
    assert from_stdin.exit_code == 0 and from_stdin.stdout == from_file and len(from_file.splitlines()) == 2
    empty = runner.invoke(app, ["score", "-", "--checkpoint", str(run)], input="")
    assert empty.exit_code == 1 and "no lines" in empty.stderr
