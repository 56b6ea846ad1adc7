"""Evaluation-time techniques: the neural cache and dynamic evaluation. Each reduces to the
static score when switched off, helps a lot on text that repeats itself, never lets a
token's score depend on the text after it, and leaves the model as it was."""

import hashlib
import json

import pytest
import torch
from conftest import tiny_sets, write_tiny_corpus
from typer.testing import CliRunner

from lstm_lm import LanguageModel
from lstm_lm.cli import app
from lstm_lm.config import ModelConfig
from lstm_lm.data import batchify
from lstm_lm.errors import ConfigError
from lstm_lm.evaluation.dynamic_eval import DynamicEval, dynamic_log_probs, gradient_statistics
from lstm_lm.evaluation.evaluate import evaluate, perplexity_of
from lstm_lm.evaluation.neural_cache import CacheHistory, NeuralCache, cache_log_probs, cache_probabilities, collect
from lstm_lm.model import LSTMLanguageModel

VOCAB = 40


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(embedding_size=24, hidden_size=24, num_layers=2, dropout=0.0, tie_weights=True)
    return LSTMLanguageModel(cfg, VOCAB).eval()


def _text(n=300, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
def test_cache_with_lambda_zero_is_the_static_perplexity(batch):
    model, data = _model(), batchify(_text(), batch)
    static = evaluate(model, data, bptt=9)
    chunks = collect(model, data, bptt=9)
    cached = perplexity_of(cache_log_probs(chunks, NeuralCache(window=50, theta=0.5, lam=0.0))[0])
    assert cached["tokens"] == static["tokens"]
    assert cached["perplexity"] == pytest.approx(static["perplexity"], rel=1e-12)


def test_dynamic_evaluation_with_lr_zero_is_the_static_perplexity():
    model, text = _model(), _text()
    static = evaluate(model, batchify(text, 1), bptt=9)
    for rule, stats in (("sgd", None), ("rms", gradient_statistics(model, text[:60, None], 9))):
        scores = dynamic_log_probs(model, text[:, None], DynamicEval(lr=0.0, segment=9, rule=rule), stats)
        # The same up to float32 rounding: the static pass scores spans of several
        # segments in one product, which rounds otherwise than one per segment.
        assert perplexity_of(scores)["perplexity"] == pytest.approx(static["perplexity"], rel=1e-6)


@pytest.mark.parametrize("impl", ["cudnn", "custom"])
def test_evaluation_in_spans_scores_as_the_textbook_chunk_by_chunk_pass(impl, monkeypatch):
    """evaluate() runs the recurrent layers over spans of several bptt chunks (fewer kernel
    calls); the state carried from span to span makes every token's score the one of
    the textbook pass: logits of each chunk from the state the last one ended in."""
    import lstm_lm.evaluation.evaluate as evaluate_mod

    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=24, hidden_size=24, num_layers=2, dropout=0.3, tie_weights=True, impl=impl)
    model, data, bptt = LSTMLanguageModel(cfg, VOCAB), batchify(_text(301), 3), 9
    monkeypatch.setattr(evaluate_mod, "SPAN_TOKENS", 2 * bptt * 3 + 5)  # spans of 2 chunks, a ragged last one
    model.train()
    got = evaluate(model, data, bptt)
    assert model.training  # left as it was
    model.eval()
    nll, hits, state = 0.0, [0, 0], None
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            x, y = data[i : i + bptt], data[i + 1 : i + 1 + bptt]
            logits, state = model(x, state)
            logits, y = logits.flatten(0, 1).double(), y.flatten()
            nll += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            rank = (logits > logits.gather(1, y[:, None])).sum(1)
            hits = [hits[0] + (rank < 1).sum().item(), hits[1] + (rank < 5).sum().item()]
    n = data.numel() - data.size(1)
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-6)
    assert [got["top1_accuracy"] * n, got["top5_accuracy"] * n] == pytest.approx(hits)


def test_cache_probability_is_the_share_of_similar_states_followed_by_the_target():
    """Against the definition, written out for one stream: softmax(theta h_t . h_j) over the
    `window` positions before t, summed where the word after j is the target."""
    torch.manual_seed(0)
    h, targets, window, theta = torch.randn(12, 1, 5), torch.randint(0, 3, (12, 1)), 4, 0.7
    history = CacheHistory(window, 1, 5, torch.device("cpu"))
    got = []
    for start in range(0, 12, 5):  # chunks of 5, 5, 2: the ring wraps around
        p, _ = cache_probabilities(history, h[start : start + 5], targets[start : start + 5], theta)
        got.append(p[:, 0])
        history.add(h[start : start + 5], targets[start : start + 5])
    got = torch.cat(got)
    assert got[0] == 0  # nothing cached yet
    for t in range(1, 12):
        past = list(range(max(0, t - window), t))
        weights = torch.softmax(theta * h[past, 0] @ h[t, 0], dim=0)
        want = sum(w for w, j in zip(weights, past) if targets[j, 0] == targets[t, 0])
        torch.testing.assert_close(got[t], torch.as_tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def test_a_tokens_score_never_depends_on_the_text_after_it():
    model = _model()
    a = _text(120, seed=1)
    b = a.clone()
    t = 70  # the scores of positions up to t (predicting tokens 1..t+1... up to index t)
    b[t + 1 :] = _text(120 - t - 1, seed=2)  # everything after token t differs
    cache = NeuralCache(window=30, theta=0.8, lam=0.3)
    scores = [cache_log_probs(collect(model, batchify(x, 1), 9), cache)[0][:, 0] for x in (a, b)]
    assert torch.equal(scores[0][:t], scores[1][:t])  # position i scores token i+1; i < t reads only a[:t+1]
    assert not torch.equal(scores[0][t:], scores[1][t:])
    stats = gradient_statistics(model, _text(60, seed=3)[:, None], 9)
    for settings, s in (
        (DynamicEval(lr=0.3, decay=0.01, segment=9, rule="sgd"), None),
        (DynamicEval(lr=1e-3, decay=0.01, segment=9, rule="rms"), stats),
    ):
        scores = [dynamic_log_probs(model, x[:, None], settings, s) for x in (a, b)]
        assert torch.equal(scores[0][:t], scores[1][:t])
        assert not torch.equal(scores[0][t:], scores[1][t:])


def test_settings_are_checked():
    for bad in (dict(window=0), dict(theta=-1.0), dict(lam=1.5)):
        with pytest.raises(ValueError):
            NeuralCache(**bad)
    for bad in (dict(lr=-1.0), dict(decay=1.0), dict(segment=0), dict(rule="adam")):
        with pytest.raises(ValueError):
            DynamicEval(**bad)
    with pytest.raises(ValueError, match="one stream"):
        dynamic_log_probs(_model(), torch.zeros(10, 2, dtype=torch.long), DynamicEval(rule="sgd"))
    with pytest.raises(ValueError, match="gradient statistics"):
        dynamic_log_probs(_model(), torch.zeros(10, 1, dtype=torch.long), DynamicEval(rule="rms"))


# -------------------------------------------------------------- the API and the CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltime")
    corpus = write_tiny_corpus(root / "tiny")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LSTM_LM_CACHE", str(root / "cache"))
        result = CliRunner().invoke(
            app, ["train", "--data", str(corpus), "--out", str(root / "run"), *tiny_sets(corpus)]
        )
    assert result.exit_code == 0, result.output
    return root / "run"


def _weights_digest(run):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*.safetensors")}


def test_dynamic_evaluation_leaves_the_weights_on_disk_and_in_memory(tiny_run):
    on_disk = _weights_digest(tiny_run)
    lm = LanguageModel.load(tiny_run)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    static = lm.evaluate("valid", batch_size=1)
    result = lm.evaluate("valid", dynamic=DynamicEval(lr=0.05, segment=8, rule="sgd"))
    assert result["protocol"] == "dynamic evaluation" and result["batch_size"] == 1
    assert result["settings"] == {"lr": 0.05, "decay": 0.0, "segment": 8, "rule": "sgd"}
    assert result["perplexity"] != static["perplexity"]
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert lm.evaluate("valid", batch_size=1)["perplexity"] == static["perplexity"]
    assert _weights_digest(tiny_run) == on_disk


def _eval(run, *args):
    return CliRunner().invoke(app, ["eval", "--checkpoint", str(run), "--device", "cpu", *args])


def test_eval_cli_names_the_protocol_and_its_settings(tiny_run):
    static = json.loads(_eval(tiny_run, "--batch-size", "1").stdout)
    assert static["protocol"] == "static"
    result = _eval(tiny_run, "--cache", "--window", "50", "--theta", "0.4", "--lambda", "0.2", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    cached = json.loads(result.stdout)
    assert cached["protocol"] == "neural cache"
    assert cached["settings"] == {"window": 50, "theta": 0.4, "lambda": 0.2}
    assert cached["static_perplexity"] == pytest.approx(static["perplexity"], rel=1e-12)
    result = _eval(tiny_run, "--dynamic", "--rule", "sgd", "--lr", "0.05", "--segment", "8")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["protocol"] == "dynamic evaluation"


def test_eval_tune_fits_on_valid_then_scores_the_split_once(tiny_run, monkeypatch):
    import lstm_lm.evaluation.dynamic_eval as dynamic_eval

    result = _eval(tiny_run, "--cache", "--tune", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["split"] == "test" and out["tuned"]["split"] == "valid" and out["tuned"]["trials"] == 6 * 6 * 7
    assert "tuned on valid" in result.stderr
    assert out["perplexity"] < out["static_perplexity"]  # the tiny corpus repeats its sentences

    monkeypatch.setattr(dynamic_eval, "TUNE_TOKENS", 100)
    monkeypatch.setattr(dynamic_eval, "STATS_TOKENS", 100)
    result = _eval(tiny_run, "--dynamic", "--tune", "--segment", "8")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tuned"]["tokens"] == 100 and out["tuned"]["trials"] == 9
    assert out["settings"]["lr"] in dynamic_eval.TUNE_LRS["rms"] and out["gradient_statistics"]["tokens"] == 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "10"], "--window needs --cache"),
        (["--lr", "0.1"], "--lr needs --dynamic"),
        (["--cache", "--dynamic"], "one at a time"),
        (["--tune"], "--tune needs --cache or --dynamic"),
        (["--dynamic", "--rule", "adam"], "rule (--rule): must be one of sgd, rms"),
        (["--dynamic", "--batch-size", "4"], "dynamic evaluation reads one stream"),
        (["--cache", "--lambda", "2"], "lam (--lambda): must be in [0, 1], got 2"),
        (["--dynamic", "--decay", "1"], "decay (--decay): must be in [0, 1), got 1.0"),
    ],
)
def test_eval_cli_refuses_bad_options_with_one_line(tiny_run, args, message):
    result = _eval(tiny_run, *args)
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


def test_the_api_and_the_cli_check_a_setting_alike(tiny_run):
    """One declaration (evaluation/protocols.py): the API raises the message the CLI prints."""
    from lstm_lm.evaluation.protocols import DynamicEval

    with pytest.raises(ValueError, match=r"decay \(--decay\): must be in \[0, 1\), got 1.0"):
        DynamicEval(decay=1.0)
    assert DynamicEval(decay=0.9995).decay == 0.9995  # the CLI's bound is the API's: below 1
    lm = LanguageModel.load(tiny_run)
    with pytest.raises(ConfigError, match="one at a time"):
        lm.evaluate("valid", cache=NeuralCache(), dynamic=DynamicEval())
    with pytest.raises(ConfigError, match="one stream"):
        lm.evaluate("valid", batch_size=4, dynamic=DynamicEval())


def test_both_lower_perplexity_a_lot_on_text_that_repeats_itself(tiny_run):
    """A trained model reads a random 40-token passage eight times: the cache finds the
    states of the earlier readings, dynamic evaluation learns the passage."""
    model = LanguageModel.load(tiny_run).model
    text = torch.randint(0, model.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).repeat(8)
    static = evaluate(model, batchify(text, 1), bptt=10)["perplexity"]
    cached = perplexity_of(
        cache_log_probs(collect(model, batchify(text, 1), 10), NeuralCache(window=200, theta=1.0, lam=0.5))[0]
    )["perplexity"]
    dynamic = perplexity_of(dynamic_log_probs(model, text[:, None], DynamicEval(lr=1.0, segment=10, rule="sgd")))[
        "perplexity"
    ]
    assert cached < static / 3 and dynamic < static / 3, (static, cached, dynamic)
