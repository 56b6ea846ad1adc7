"""The adaptive softmax: a proper distribution, the same as torch.nn's with copied weights,
its fused loss and its exact ranks, and every command on a model that uses it."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lstm_lm.adaptive import AdaptiveSoftmax, check_cutoffs, default_cutoffs
from lstm_lm.config import ModelConfig
from lstm_lm.model import LSTMLanguageModel

V, H = 50, 32
CUTOFFS = [10, 30]


def _adaptive(tied_words: torch.Tensor | None = None, seed: int = 0) -> AdaptiveSoftmax:
    torch.manual_seed(seed)
    out = AdaptiveSoftmax(H, V, CUTOFFS, div_value=4.0, tied=tied_words is not None)
    with torch.no_grad():  # not the zero initial biases: let them count in the checks
        out.head_bias.normal_(0, 0.5)
        for _, tail in out.tails:
            tail.bias.normal_(0, 0.5)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_probabilities_of_every_word_sum_to_one(tied):
    words = torch.randn(V, H) * 0.3 if tied else None
    out = _adaptive(words)
    h = torch.randn(7, H) * 2
    log_p = out.log_probs(h, words)
    assert log_p.shape == (7, V)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(7, dtype=torch.float32), atol=1e-5, rtol=0)


def test_same_distribution_as_torch_nn_with_copied_weights():
    out = _adaptive()
    ref = nn.AdaptiveLogSoftmaxWithLoss(H, V, CUTOFFS, div_value=4.0, head_bias=True)
    with torch.no_grad():
        ref.head.weight.copy_(out.head_weight(None))
        ref.head.bias.copy_(out.head_bias)
        for (proj, lin), (ref_proj, ref_lin) in zip(out.tails, ref.tail):
            lin.bias.zero_()  # torch.nn's tails have no bias
            ref_proj.weight.copy_(proj.weight)
            ref_lin.weight.copy_(lin.weight)
    h, y = torch.randn(40, H), torch.randint(0, V, (40,))
    torch.testing.assert_close(out.log_probs(h), ref.log_prob(h))
    torch.testing.assert_close(out.target_log_probs(h, y), ref(h, y).output)
    torch.testing.assert_close(out.loss(h, y), ref(h, y).loss)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_its_gradients_match_the_plain_distribution(tied):
    words = (torch.randn(V, H) * 0.3).requires_grad_() if tied else None
    out = _adaptive(words)
    h = torch.randn(60, H, requires_grad=True)
    y = torch.cat([torch.arange(V), torch.randint(0, V, (10,))])  # every word, so every cluster
    params = [h, *out.parameters()] + ([words] if tied else [])
    fused = torch.autograd.grad(out.loss(h, y, words), params)
    plain_loss = F.nll_loss(out.log_probs(h, words), y)
    plain = torch.autograd.grad(plain_loss, params)
    torch.testing.assert_close(out.loss(h, y, words), plain_loss)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the block-by-block evaluation path
        torch.testing.assert_close(
            out.target_log_probs(h, y, words), out.log_probs(h, words).gather(1, y[:, None])[:, 0]
        )


def test_top_k_hits_are_exact():
    out = _adaptive()
    h = torch.randn(500, H) * 3
    y = torch.randint(0, V, (500,))
    total, hits = out.loss_and_hits(h, y, None, (1, 5))
    log_p = out.log_probs(h)
    assert total.item() == pytest.approx(-log_p.gather(1, y[:, None]).double().sum().item(), rel=1e-6)
    for k, n in zip((1, 5), hits.tolist()):
        assert n == int((log_p.topk(k, dim=1).indices == y[:, None]).any(1).sum())


def test_cutoffs_are_checked():
    assert check_cutoffs([10, 30], 50) is None
    for bad in ([30, 10], [10, 50], [0, 5], []):
        assert "model.cutoffs" in check_cutoffs(bad, 50)
    assert default_cutoffs(267_735) == [22_311, 66_933]
    with pytest.raises(ValueError, match="model.cutoffs"):
        AdaptiveSoftmax(H, V, [10, 60])


def test_language_model_with_adaptive_softmax_learns_and_scores():
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=H, hidden_size=H, num_layers=1, dropout=0.0, softmax="adaptive", cutoffs=CUTOFFS)
    model = LSTMLanguageModel(cfg, V)
    assert model.decoder is None and model.adaptive.head_words is None  # the head's words are the embedding's
    text = torch.arange(V).repeat(8)[:, None]  # 0, 1, ..., 49, 0, 1, ...: every word, predictable
    x, y = text[:-1], text[1:]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = None
    for _ in range(60):
        objective, ce, _ = model.training_loss(x, y)
        first = first if first is not None else ce.item()
        opt.zero_grad()
        objective.backward()
        opt.step()
    assert ce.item() < 0.3 * first
    model.eval()
    with torch.no_grad():
        out, _ = model.features(x)
        scores = model.scores(out[:, 0])
        torch.testing.assert_close(torch.softmax(scores, -1).sum(-1), torch.ones(x.size(0)), atol=1e-5, rtol=0)
        lp = model.target_log_probs(out[:, 0], y[:, 0])
        torch.testing.assert_close(lp, scores.log_softmax(-1).gather(1, y)[:, 0], atol=1e-5, rtol=0)


def test_every_command_works_on_an_adaptive_softmax_model(tiny_corpus, tmp_path, monkeypatch):
    """train, complete (greedy, sampled, --next), eval (static, cache, dynamic), score,
    the Python API, a served request and the ONNX export, on one adaptive model."""
    from conftest import tiny_sets
    from typer.testing import CliRunner

    from lstm_lm import LanguageModel
    from lstm_lm.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    run = tmp_path / "adaptive"
    args = [
        "train",
        "--data",
        str(tiny_corpus),
        "--out",
        str(run),
        *tiny_sets(tiny_corpus, "model.softmax=adaptive", "model.cutoffs=[6, 12]", "train.epochs=6"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "adaptive softmax (cutoffs [6, 12])" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["test_perplexity"] < 10  # the tiny corpus is learnable: ~20 words, uniform is ~20

    def ok(*cmd, **kw):
        r = runner.invoke(app, [str(c) for c in cmd], **kw)
        assert r.exit_code == 0, r.output
        return r.stdout

    assert ok("complete", "the cat", "--checkpoint", run, "--words", "4").split()
    assert ok("complete", "the cat", "--checkpoint", run, "--temperature", "0.8", "--seed", "1").split()
    rows = [
        line.split("\t")
        for line in ok("complete", "the cat", "--checkpoint", run, "--next", "--top-k", "3").splitlines()
    ]
    assert len(rows) == 3 and 0 < sum(float(p) for _, p in rows) <= 1.0001
    static = json.loads(ok("eval", "--checkpoint", run, "--batch-size", "1"))
    assert static["perplexity"] == pytest.approx(
        json.loads(ok("eval", "--checkpoint", run, "--batch-size", "1", "--cache", "--lambda", "0"))["perplexity"],
        rel=1e-9,
    )
    dynamic = json.loads(ok("eval", "--checkpoint", run, "--dynamic", "--lr", "0"))
    assert dynamic["perplexity"] == pytest.approx(static["perplexity"], rel=1e-6)
    assert 0 <= static["top1_accuracy"] <= static["top5_accuracy"] <= 1
    scored = json.loads(ok("score", "-", "--checkpoint", run, input="the cat sat on the mat\n"))
    assert scored["tokens"] == 7 and scored["logprob"] < 0

    lm = LanguageModel.load(run, precision=None)  # the run's own precision, as `lstm-lm eval` uses
    assert lm.evaluate("test")["perplexity"] == pytest.approx(
        json.loads(ok("eval", "--checkpoint", run))["perplexity"], rel=1e-9
    )
    probs = lm.session("the cat").probabilities()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)

    fastapi = pytest.importorskip("fastapi.testclient")
    from lstm_lm.inference.serve import create_app

    client = fastapi.TestClient(create_app(lm))
    assert len(client.post("/v1/next", json={"prompt": "the cat", "k": 2}).json()["words"]) == 2

    pytest.importorskip("onnxruntime")
    exported = json.loads(ok("export", "--checkpoint", run, "--out", tmp_path / "adaptive.onnx"))
    assert exported["max_abs_diff"] < 1e-4
    assert exported["valid_perplexity"]["onnx"] == pytest.approx(exported["valid_perplexity"]["pytorch_fp32"], rel=1e-5)
