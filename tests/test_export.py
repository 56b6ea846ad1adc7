"""`lstm-lm export --format onnx`: the graph gives PyTorch's logits over a prompt fed in
pieces, for every cell; int8 quantization; the docs page's code runs."""

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="the export extra is not installed")

from lstm_lm import LanguageModel, cells  # noqa: E402
from lstm_lm.checkpoint import save_checkpoint  # noqa: E402
from lstm_lm.cli import app  # noqa: E402
from lstm_lm.config import load_config  # noqa: E402
from lstm_lm.inference.export import export_onnx, max_logit_difference, ort_session, state_names  # noqa: E402
from lstm_lm.model import LSTMLanguageModel  # noqa: E402

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def test_export_of_the_demo_model_matches_pytorch(demo_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_workdir)
    out = tmp_path / "demo.onnx"
    result = runner.invoke(app, ["export", "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["inputs"] == ["input_ids", "h0", "c0"] and summary["outputs"] == ["logits", "h0_out", "c0_out"]
    assert summary["max_abs_diff"] < 1e-4 and summary["bytes"] == out.stat().st_size
    ppl = summary["valid_perplexity"]
    assert ppl["onnx"] == pytest.approx(ppl["pytorch_fp32"], rel=1e-5)

    # the docs page's ten lines, run against this file
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out.rename(tmp_path / "model.onnx")
    printed = []
    exec(compile(code, str(DOCS), "exec"), {"print": printed.append})
    assert printed == ["Tamil"]


def test_int8_is_smaller_and_reports_the_change_in_perplexity(demo_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_workdir)
    result = runner.invoke(app, ["export", "--int8", "--out", str(tmp_path / "q.onnx")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["int8"] and summary["bytes"] < summary["fp32_bytes"] / 2
    ppl = summary["valid_perplexity"]
    assert (
        ppl["change"] == pytest.approx(ppl["onnx"] - ppl["pytorch_fp32"])
        and abs(ppl["change"]) < 0.05 * ppl["pytorch_fp32"]
    )


@pytest.mark.parametrize("cell,sizes", [(cell, [200, 200] if cell == "lstm" else [32, 24]) for cell in cells.names()])
def test_every_cell_and_the_ptb_small_shape_match_pytorch_over_pieces(tmp_path, cell, sizes):
    """The ptb-small recipe's model (2x200, tied, 10k words), and every other cell in stacks
    of unequal layers, with random weights: the graph does not depend on what was learned."""
    cfg = load_config(
        "ptb-small",
        overrides=[
            f"model.cell={cell}",
            f"model.hidden_sizes={sizes}".replace(" ", ""),
            f"model.embedding_size={sizes[-1]}",
        ],
    )
    from tokenizers import Tokenizer, models

    vocab = 10_000 if cell == "lstm" else 300
    words = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    torch.manual_seed(0)
    model = LSTMLanguageModel(cfg.model, tokenizer.get_vocab_size()).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, cfg)
    lm = LanguageModel.load(tmp_path / "ckpt")
    summary = export_onnx(lm, tmp_path / "m.onnx", data=str(tmp_path / "no-corpus"))
    assert summary["max_abs_diff"] < 1e-4 and summary["valid_perplexity"] is None
    session = ort_session(tmp_path / "m.onnx")
    assert max_logit_difference(lm.model, session, state_names(lm.model), seed=1) < 1e-4
