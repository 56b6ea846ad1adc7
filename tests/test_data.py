"""Sources, tokenizers, the token-id cache and the truncated-BPTT layout."""

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, requires_shared_data
from tokenizers import normalizers, pre_tokenizers

from lstm_lm import data as data_mod
from lstm_lm.config import DataConfig
from lstm_lm.data import (
    EOS,
    UNK,
    Streams,
    batchify,
    build_tokenizer,
    count_tokens,
    detokenize,
    encode_lines,
    get_batch,
    line_encoder,
    load_corpus,
    resolve_source,
    smallest_uint,
    to_tensor,
)
from lstm_lm.demo import REGION_LANGUAGE, SEED_ANSWER, SEED_PROMPT, demo_corpus, demo_splits, gap_of
from lstm_lm.errors import DataError


def test_word_tokenizer_round_trip_and_eos():
    tok = build_tokenizer(DataConfig(tokenizer="word"), ["the cat sat", "the dog"])
    ids = encode_lines(tok, ["the cat sat", "the dog"]).tolist()
    assert [tok.id_to_token(i) for i in ids] == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    assert detokenize(tok, ids[:3], "word") == "the cat sat"
    assert tok.token_to_id(UNK) == 0 and tok.token_to_id(EOS) == 1


def test_word_vocabulary_comes_from_train_only(tiny_corpus):
    (tiny_corpus / "valid.txt").write_text("the zebra sat\n", encoding="utf-8")
    corpus = load_corpus(DataConfig(source=str(tiny_corpus)))
    assert corpus.tokenizer.token_to_id("zebra") is None
    valid = [corpus.tokenizer.id_to_token(int(i)) for i in corpus.splits["valid"]]
    assert valid == ["the", UNK, "sat", EOS]


def test_min_freq_max_size_and_lowercase():
    lines = ["A a a a b b c", "A d"]
    tok = build_tokenizer(DataConfig(min_freq=2), lines)
    assert set(tok.get_vocab()) == {UNK, EOS, "a", "A", "b"}
    tok = build_tokenizer(DataConfig(max_size=3), lines)
    assert set(tok.get_vocab()) == {UNK, EOS, "a"}  # the most frequent word wins
    tok = build_tokenizer(DataConfig(lowercase=True), lines)
    assert tok.get_vocab()["a"] == 2 and "A" not in tok.get_vocab()
    assert encode_lines(tok, ["A"]).tolist() == [tok.token_to_id("a"), 1]


def test_literal_unk_in_text_maps_to_the_one_unk_id():
    """PTB writes unknown words as '<unk>'; they must not get a second id."""
    tok = build_tokenizer(DataConfig(), ["a <unk> b <unk>", "b"])
    assert tok.get_vocab_size() == 4
    assert encode_lines(tok, ["<unk> a"]).tolist() == [0, tok.token_to_id("a"), 1]


def test_split_punctuation_detaches_commas_and_full_stops():
    tok = build_tokenizer(DataConfig(split_punctuation=True), ["My name is John, I speak Tamil."])
    enc = tok.encode("My name is John, I speak Tamil.", add_special_tokens=False)
    assert enc.tokens == ["My", "name", "is", "John", ",", "I", "speak", "Tamil", "."]
    assert detokenize(tok, enc.ids, "word") == "My name is John, I speak Tamil."


def test_char_tokenizer_round_trip():
    text = "To be, or not to be: é!"
    tok = build_tokenizer(DataConfig(tokenizer="char"), [text])
    ids = encode_lines(tok, [text]).tolist()
    assert len(ids) == len(text) + 1 and ids[-1] == 1
    assert detokenize(tok, ids, "char") == text


def test_bpe_tokenizer_round_trip():
    lines = ["the quick brown fox jumps over the lazy dog"] * 20 + ["a fox is quick"] * 5
    tok = build_tokenizer(DataConfig(tokenizer="bpe", vocab_size=60), lines)
    assert tok.get_vocab_size() <= 60
    ids = encode_lines(tok, ["the lazy fox"]).tolist()
    assert detokenize(tok, ids, "bpe") == "the lazy fox"


def test_smallest_integer_type():
    assert smallest_uint(200) == np.uint8
    assert smallest_uint(256) == np.uint8
    assert smallest_uint(257) == np.uint16
    assert smallest_uint(70_000) == np.uint32


def test_second_run_uses_the_cache_without_tokenizing(tiny_corpus, monkeypatch, capsys):
    cfg = DataConfig(source=str(tiny_corpus))
    first = load_corpus(cfg)
    assert "cached token ids in" in capsys.readouterr().err

    def fail(*a, **k):
        raise AssertionError("the text was read again")

    monkeypatch.setattr(data_mod, "read_source", fail)
    monkeypatch.setattr(data_mod, "encode_lines", fail)
    second = load_corpus(cfg)
    assert "no tokenization needed" in capsys.readouterr().err
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(first.splits[split], second.splits[split])
        assert second.splits[split].dtype == np.uint8


def test_cache_key_follows_file_contents_and_settings(tiny_corpus, capsys):
    load_corpus(DataConfig(source=str(tiny_corpus)))
    capsys.readouterr()
    load_corpus(DataConfig(source=str(tiny_corpus), lowercase=True))
    assert "tokenizing" in capsys.readouterr().err
    with open(tiny_corpus / "train.txt", "a", encoding="utf-8") as f:
        f.write("a new line\n")
    corpus = load_corpus(DataConfig(source=str(tiny_corpus)))
    assert "tokenizing" in capsys.readouterr().err
    assert corpus.tokenizer.token_to_id("new") is not None


def test_single_file_is_split_by_fractions(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("\n".join(f"line {i}" for i in range(100)) + "\n", encoding="utf-8")
    corpus = load_corpus(DataConfig(source=str(f), valid_fraction=0.1, test_fraction=0.2))
    lens = {s: int((a == 1).sum()) for s, a in corpus.splits.items()}  # one <eos> per line
    assert lens == {"train": 70, "valid": 10, "test": 20}


def test_demo_corpus_is_deterministic_and_covers_the_seed_sentence():
    assert demo_corpus(200, seed=3) == demo_corpus(200, seed=3)
    assert demo_corpus(200, seed=3) != demo_corpus(200, seed=4)
    assert len(REGION_LANGUAGE) >= 25
    lines = demo_corpus(2000)
    assert f"{SEED_PROMPT} {SEED_ANSWER}." in lines
    for line in lines:  # every stated region is followed by its own language
        for region, lang in REGION_LANGUAGE.items():
            if f"from {region}" in line:
                assert f"speak {lang}." in line, line
    splits = demo_splits(400)
    assert not set(splits["test"]) & {l for l in splits["train"] if l.count(" ") > 12}


@pytest.mark.parametrize("gap", [0, 1, 2, 3, 4, 7, 20, 40])
def test_demo_gap_is_met_exactly(gap):
    lines = demo_corpus(300, seed=1, gap_min=gap, gap_max=gap)[1:]  # line 0 is the seed sentence
    for line in lines:
        head = line.split(" and I speak")[0]
        region = next(r for r in REGION_LANGUAGE if f" {r}" in head)
        between = head.split(f" {region}", 1)[1]
        assert len(between.replace(",", " ").split()) == gap, line
        assert f"speak {REGION_LANGUAGE[region]}." in line


def test_demo_gap_range_is_covered_and_reaches_the_corpus(tmp_path):
    gaps = [gap_of(line) for line in demo_corpus(2000, gap_min=3, gap_max=9)[1:]]
    assert set(gaps) == set(range(3, 10))
    assert max(gaps.count(g) for g in range(3, 10)) < 2 * min(gaps.count(g) for g in range(3, 10))  # uniform
    splits = demo_splits(400, gap_min=30, gap_max=30)
    assert all(gap_of(line) == 30 for part in splits.values() for line in part[1:])
    # Through the config: another gap is another corpus (and another cache entry).
    short = load_corpus(DataConfig(source="demo", demo_size=200, gap_min=0, gap_max=0, cache_dir=str(tmp_path)))
    long = load_corpus(DataConfig(source="demo", demo_size=200, gap_min=25, gap_max=25, cache_dir=str(tmp_path)))
    assert len(long.splits["train"]) > len(short.splits["train"]) + 199 * 20


def test_batchify_layout_streams_are_columns():
    ids = torch.arange(23)
    data = batchify(ids, 4)  # 5 rows x 4 streams, 3 tokens dropped
    assert data.shape == (5, 4)
    assert data[:, 1].tolist() == [5, 6, 7, 8, 9]  # stream 1 reads a contiguous stretch
    x, y = get_batch(data, 0, 3)
    assert x.shape == y.shape == (3, 4)
    assert torch.equal(y[:-1], x[1:]) and torch.equal(y[-1], data[3])
    x, y = get_batch(data, 3, 3)  # the last chunk is shorter
    assert x.shape == (1, 4) and torch.equal(y[0], data[4])


def test_missing_path_empty_file_and_missing_split_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        resolve_source(str(tmp_path / "empty.txt"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_text("a b\n")
    with pytest.raises(DataError, match="missing valid.txt, test.txt"):
        resolve_source(str(tmp_path / "d"))


def test_not_utf8_is_reported(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"good line\n" * 50 + "caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text: invalid byte at offset 503"):
        load_corpus(DataConfig(source=str(f)))


def test_hub_dataset_offline_says_to_pass_local_files():
    with pytest.raises(DataError, match="pass local files"):
        load_corpus(DataConfig(source="wikitext:wikitext-2-raw-v1"))


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert not data_mod.hub_reachable()
    start = time.perf_counter()
    with pytest.raises(DataError, match="unreachable .* pass local files"):
        load_corpus(DataConfig(source="hf:someone/some-corpus"))
    assert time.perf_counter() - start < 10


@requires_shared_data
def test_ptb_has_the_standard_10k_vocabulary():
    corpus = load_corpus(DataConfig(source=str(SHARED_DATA / "ptb")))
    assert corpus.vocab_size == 10_000
    assert len(corpus.splits["train"]) == 887_521 + 42_068  # words + one <eos> per line
    assert corpus.splits["train"].dtype == np.uint16


# -- the streamed cache and the memory-mapped batches ---------------------------------------

ODD_TEXT = (
    "the cat sat\r\n"  # Windows line ends
    "on the mat\r"  # old Mac line ends
    "\r\n"  # an empty line
    "<unk> the dog   sat\tdown\n"  # PTB's literal <unk>, runs of spaces and a tab
    + " ".join(["long"] * 400)
    + " line\n"  # a line many blocks long
    "caf\u00e9 na\u00efve \u00fcber\x85next\n"  # non-ASCII, and NEL, a line break to str.splitlines()
    "the end, no final newline"
)


def _tokenizers_ids(tok, lines: list[str]) -> np.ndarray:
    """The ids `tokenizers` itself gives the lines, each followed by <eos>."""
    eos = tok.token_to_id(EOS)
    return np.array([i for enc in tok.encode_batch(lines, add_special_tokens=False) for i in [*enc.ids, eos]])


def _whole_text_lines(path: Path) -> list[str]:
    """The lines as one read of the whole file cuts them (universal newlines, then splitlines)."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_streamed_cache_has_the_ids_of_encoding_the_whole_text_at_once(tmp_path, monkeypatch, kind):
    d = tmp_path / "odd"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.txt").write_bytes(ODD_TEXT.encode("utf-8"))
    cfg = DataConfig(source=str(d), tokenizer=kind, vocab_size=60, lowercase=True)
    lines = _whole_text_lines(d / "train.txt")
    tok = build_tokenizer(cfg, lines)  # the whole train split in one block
    want = _tokenizers_ids(tok, lines)
    monkeypatch.setattr(data_mod, "BLOCK_CHARS", 16)  # the same text read 16 characters at a time,
    monkeypatch.setattr(data_mod, "BLOCK_LINES", 2)  # counted and encoded two lines at a time
    corpus = load_corpus(cfg)
    assert corpus.tokenizer.get_vocab() == tok.get_vocab()
    for split in ("train", "valid", "test"):
        assert isinstance(corpus.splits[split], np.memmap)
        np.testing.assert_array_equal(corpus.splits[split], want)
    if kind == "word":  # the vocabulary, against a count of our own
        counts = Counter(w for line in lines for w in line.lower().split() if w != "<unk>")
        assert set(tok.get_vocab()) == set(counts) | {UNK, EOS}
        assert tok.token_to_id("long") == 2  # the most frequent word comes first


# Text the plain word tokenizer's own encoder (str.split and a dict) must read as
# `tokenizers` does: special tokens glued to words and in upper case, empty and blank
# lines, Unicode spaces (no-break, ideographic) and a non-space (zero-width), and the
# characters \x1c-\x1f, whitespace to Python only (their blocks go to tokenizers).
ODD_WORDS = [
    "a<unk>b <UNK> x<eos>y <eos><unk>",
    "",
    "   ",
    "caf\u00e9\u00a0na\u00efve\u3000z\u200bw",
    "Abc ABC abc <Unk> <EOS>",
    "tab\there\x1fodd",
    "\x1c a \x1d\x1e",
    "<eo<unk>s> <un<eos>k>",
]


@pytest.mark.parametrize("lowercase", [False, True])
def test_plain_word_encoder_gives_the_ids_of_tokenizers(lowercase):
    cfg = DataConfig(lowercase=lowercase)
    tok = build_tokenizer(cfg, ["a b x y Abc abc caf\u00e9 na\u00efve z w <eo s> odd"])
    assert line_encoder(tok).__name__ == "encode"  # the plain word tokenizer's own encoder
    for lines in [ODD_WORDS, *([line] for line in ODD_WORDS), []]:
        np.testing.assert_array_equal(encode_lines(tok, lines), _tokenizers_ids(tok, lines).astype(np.uint8))
    # The vocabulary is counted the same way: a Sequence of one WhitespaceSplit is the
    # same pre-tokenizer, counted through tokenizers.
    norm = normalizers.Lowercase() if lowercase else None
    through = count_tokens(ODD_WORDS, "word", norm, pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()]))
    assert count_tokens(ODD_WORDS, "word", norm, pre_tokenizers.WhitespaceSplit()) == through
    assert through["a"] == 2 and "<unk>" not in through


def test_wikitext_file_names_are_read(tmp_path):
    d = tmp_path / "wikitext-2"
    d.mkdir()
    for split, text in (("train", " = Title = \n the cat sat \n"), ("valid", " the cat \n"), ("test", " the sat \n")):
        (d / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    corpus = load_corpus(DataConfig(source=str(d)))
    assert corpus.tokenizer.token_to_id("=") is not None and len(corpus.splits["valid"]) == 3
    (d / "wiki.test.tokens").unlink()
    with pytest.raises(DataError, match="missing wiki.test.tokens"):
        load_corpus(DataConfig(source=str(d)))


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_memory_mapped_streams_give_the_batches_of_batchify(tiny_corpus, batch_size):
    corpus = load_corpus(DataConfig(source=str(tiny_corpus)))
    ids = corpus.splits["train"]
    eager, lazy = batchify(to_tensor(ids), batch_size), Streams(ids, batch_size)
    assert lazy.shape == tuple(eager.shape) and lazy.numel() == eager.numel()
    for data, streams in ((eager, lazy), (eager[:, 1:], lazy[:, 1:]), (eager[:, :1], lazy[:, :1])):
        for i in range(0, data.size(0) - 1, 7):
            for got, want in zip(get_batch(streams, i, 7), get_batch(data, i, 7)):
                assert got.dtype == torch.int64 and torch.equal(got, want)
    torch.testing.assert_close(lazy[2:5], eager[2:5])


ROOT = Path(__file__).resolve().parents[1]


def test_make_corpus_is_seeded_zipfian_and_in_the_ptb_layout(tmp_path):
    def make(out, seed=0):
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_corpus.py"),
                str(out),
                "--tokens",
                "200000",
                "--vocab",
                "5000",
                "--seed",
                str(seed),
            ],
            check=True,
            capture_output=True,
        )
        return {s: (out / f"{s}.txt").read_bytes() for s in ("train", "valid", "test")}

    a, b, c = make(tmp_path / "a"), make(tmp_path / "b"), make(tmp_path / "c", seed=1)
    assert a == b and a != c
    words = {s: text.decode().split() for s, text in a.items()}
    assert {s: len(w) for s, w in words.items()} == {"train": 184_000, "valid": 8_000, "test": 8_000}
    assert all(text.endswith(b"\n") for text in a.values())
    counts = Counter(words["train"]).most_common()
    # Zipf-Mandelbrot, p(k) ~ 1 / (k + 2.7): the top word about 3.7 / 2.7 times the second
    assert counts[0][1] / counts[1][1] == pytest.approx(3.7 / 2.7, rel=0.05)
    corpus = load_corpus(DataConfig(source=str(tmp_path / "a")))
    assert corpus.vocab_size <= 5000 + 2 and len(corpus.splits["train"]) == 184_000 + a["train"].count(b"\n")
