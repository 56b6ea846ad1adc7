"""The Python API (lstm_lm.LanguageModel): each method on real trained models, word, BPE and char."""

import math

import pytest
import torch
from conftest import tiny_sets, write_tiny_corpus
from typer.testing import CliRunner

from lstm_lm import LanguageModel
from lstm_lm.cli import app
from lstm_lm.demo import SEED_ANSWER, SEED_PROMPT
from lstm_lm.errors import ArgumentError, PromptError
from lstm_lm.inference.scoring import encode_text


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A word, a BPE and a character model trained on the tiny corpus (a few seconds each)."""
    root = tmp_path_factory.mktemp("api")
    corpus = write_tiny_corpus(root / "tiny")
    extra = {"word": [], "bpe": ["data.tokenizer=bpe", "data.vocab_size=40"], "char": ["data.tokenizer=char"]}
    runs = {}
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LSTM_LM_CACHE", str(root / "cache"))
        for kind, sets in extra.items():
            out = root / kind
            epochs = ["train.epochs=6"] if kind != "word" else []
            result = CliRunner().invoke(
                app, ["train", "--data", str(corpus), "--out", str(out), *tiny_sets(corpus, *sets, *epochs)]
            )
            assert result.exit_code == 0, result.output
            runs[kind] = out
    return runs


@pytest.fixture(scope="module")
def demo(demo_workdir):
    return LanguageModel.load(demo_workdir / "runs" / "demo")


def test_load_keeps_model_tokenizer_and_config_together(demo, demo_workdir):
    assert demo.kind == "word" and demo.cell == "lstm" and demo.precision == "fp32"
    assert demo.vocab_size == demo.tokenizer.get_vocab_size()
    facts = demo.describe()
    assert facts["corpus"] == "demo" and facts["vocab_size"] == demo.vocab_size
    assert 1 < facts["valid_perplexity"] < 5  # the validation of these very weights, saved with them
    assert LanguageModel.load(demo_workdir / "runs" / "latest").checkpoint == demo.checkpoint


def test_next_words_and_complete_answer_the_seed_sentence(demo):
    words = demo.next_words(SEED_PROMPT, k=5)
    assert words[0][0] == SEED_ANSWER and words[0][1] > 0.5
    probs = [p for _, p in words]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert demo.complete(SEED_PROMPT) == f"{SEED_ANSWER}."
    a = demo.complete("My name is", temperature=1.0, seed=3, words=6)
    assert a == demo.complete("My name is", temperature=1.0, seed=3, words=6)


def test_a_session_fed_word_by_word_gives_the_probabilities_of_the_whole_prompt(demo):
    whole = demo.session(SEED_PROMPT)
    session = demo.session()
    for word in SEED_PROMPT.split():
        session.feed(word)
    assert session.tokens == whole.tokens
    torch.testing.assert_close(session.probabilities(), whole.probabilities(), atol=1e-6, rtol=1e-5)
    (a, pa), (b, pb) = zip(*session.next_words(3)), zip(*whole.next_words(3))
    assert a == b and pa == pytest.approx(pb, abs=1e-6)
    # and against the full forward over the prompt, read at once by the model itself
    with torch.no_grad():
        logits, _ = demo.model(torch.tensor(whole.tokens)[:, None])
    torch.testing.assert_close(whole.probabilities(), torch.softmax(logits[-1, 0], -1), atol=1e-6, rtol=1e-5)


def test_one_more_word_costs_one_step(demo, monkeypatch):
    session = demo.session(SEED_PROMPT)
    lengths = []
    original = demo.model.features
    monkeypatch.setattr(
        demo.model,
        "features",
        lambda ids, state=None, **kw: (lengths.append(ids.size(0)), original(ids, state, **kw))[1],
    )
    session.feed("Tamil")
    assert lengths == [1]


def test_score_is_the_sum_of_the_model_s_token_log_probabilities(demo):
    texts = [SEED_PROMPT + " Tamil.", "My name is", "", SEED_PROMPT + " Malayalam."]
    scores = demo.score(texts, per_token=True)
    assert [s["text"] for s in scores] == texts
    for text, s in zip(texts, scores):
        ids = encode_text(demo.tokenizer, text)  # <eos> text <eos>
        with torch.no_grad():
            logits, _ = demo.model(torch.tensor(ids[:-1])[:, None])
        want = torch.log_softmax(logits[:, 0].double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert s["tokens"] == len(ids) - 1 == len(s["token_logprobs"])
        assert s["logprob"] == pytest.approx(float(want.sum()), abs=1e-3)
        assert [t for t, _ in s["token_logprobs"]][-1] == "<eos>"
        assert s["perplexity"] == pytest.approx(math.exp(-s["logprob"] / s["tokens"]))
    right, wrong = scores[0], scores[3]
    assert right["logprob"] > wrong["logprob"] + 5  # Tamilnadu -> Tamil, not Malayalam
    alone = demo.score(texts[0])[0]  # batched with others or alone: the same
    assert alone["logprob"] == pytest.approx(right["logprob"], abs=1e-4)
    total = sum(s["logprob"] for s in scores[:2])
    assert demo.perplexity(texts[:2]) == pytest.approx(math.exp(-total / (scores[0]["tokens"] + scores[1]["tokens"])))


def test_unknown_words_are_counted(demo):
    assert demo.score("My name is Zyxwv")[0]["unknown"] == 1


def test_trace_and_evaluate(demo):
    trace = demo.trace(SEED_PROMPT, top_k=2)
    assert trace["tokens"][-1] == "speak" and set(trace["gates"]) == {"forget", "input", "output"}
    assert trace["guesses"][-1][0][0] == SEED_ANSWER and len(trace["guesses"][-1]) == 2
    result = demo.evaluate("valid")
    assert result["split"] == "valid" and 1 < result["perplexity"] < 5
    assert result["perplexity"] == pytest.approx(demo.describe()["valid_perplexity"], rel=1e-3)


def test_bad_prompts_are_refused(demo):
    for prompt, message in [("  ", "empty"), ("Zyxwv Qwrtp", "vocabulary")]:
        with pytest.raises(PromptError, match=message):
            demo.next_words(prompt)
    with pytest.raises(ArgumentError, match=r"k \(--top-k\): must be"):
        demo.session("My name").next_words(0)


@pytest.mark.parametrize("kind", ["word", "bpe", "char"])
def test_next_words_are_whole_words_with_honest_probabilities(tiny_models, kind):
    lm = LanguageModel.load(tiny_models[kind])
    assert lm.kind == kind
    vocabulary = {w for line in open(tiny_models[kind].parent / "tiny" / "train.txt") for w in line.split()}
    words = lm.next_words("the cat sat on the", k=4)
    assert len(words) == 4
    for word, _ in words:
        assert word in vocabulary, (word, words)  # no "▁", no <eos>, no half word
    probs = [p for _, p in words]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert words[0][0] in {"mat", "log"}
    # The probability of a word is that of its pieces, one after another, and of its end.
    word, p = words[0]
    session = lm.session("the cat sat on the")
    pieces = lm.tokenizer.encode(" " + word if kind == "char" else word, add_special_tokens=False).ids
    want = 1.0
    for piece in pieces:
        want *= float(session.probabilities()[piece])
        session.feed(lm.tokenizer.id_to_token(piece)) if kind == "bpe" else session._read([piece])
    probs = session.probabilities()
    want *= 1 - float(probs[lm.pieces.continues].sum())
    assert p == pytest.approx(want, rel=1e-3)


def test_the_cli_says_why_a_completion_is_empty(tiny_models, monkeypatch):
    import lstm_lm.inference.sample as sample

    monkeypatch.setattr(sample, "_pick", lambda logits, *a: 1)  # the model picks <eos> (id 1) first
    result = CliRunner().invoke(app, ["complete", "the cat", "--checkpoint", str(tiny_models["word"])])
    assert result.exit_code == 0 and result.stdout == "\n"
    assert "ended the sentence" in result.stderr
