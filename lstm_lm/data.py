"""Corpus -> tokenizer -> flat token-id arrays on disk -> truncated-BPTT batches.

    corpus = load_corpus(cfg.data)                  # tokenizer + {"train", "valid", "test"} id arrays
    train = Streams(corpus.splits["train"], 20)     # 20 parallel streams over the ids, (T, B)
    x, y = get_batch(train, i, bptt=35)             # (bptt, B) inputs, next-token targets

The text is streamed: each split is read a block of lines at a time, the vocabulary
is counted in one pass over the train split, and each block is encoded with a
`tokenizers.Tokenizer` (the plain word tokenizer's blocks in Python, with the same
ids: `line_encoder`) and appended to the split's id file, so that neither the text
nor its encodings are ever held whole. The id files are cached, keyed by a hash of
the input text and the tokenizer, so a second run on the same data skips all of it,
and they are read memory-mapped: batches are gathered from the file as they are
needed, never copied into one tensor (a corpus of 100 million tokens costs its page
cache, not its size in RAM).
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import itertools
import json
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lstm_lm.config import DataConfig
from lstm_lm.demo import DEMO_VERSION, demo_splits
from lstm_lm.errors import DataError
from lstm_lm.utils import log, progress_bar
from lstm_lm.writing import write_atomically, write_json, write_text

UNK, EOS = "<unk>", "<eos>"
SPECIAL_TOKENS = [UNK, EOS]  # ids 0 and 1 in every tokenizer
SPLITS = ("train", "valid", "test")
# The file names of a corpus directory: ours (PTB's) and WikiText's.
SPLIT_FILES = ({s: f"{s}.txt" for s in SPLITS}, {s: f"wiki.{s}.tokens" for s in SPLITS})
CACHE_VERSION = "2"  # bump when the encoding of a corpus or the cache's layout changes
BLOCK_CHARS = 1 << 22  # text read at a time (4 Mi characters, then up to the end of a line)
BLOCK_LINES = 20_000  # lines tokenized at a time
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_ODD_SPACE = "\x1c\x1d\x1e\x1f"  # whitespace to str.split, not to tokenizers' WhitespaceSplit
# The plain word tokenizer counted and encoded in Python (see `line_encoder`); False sends
# it through `tokenizers` like the others (scripts/bench_scale.py times the two).
PLAIN_WORDS_IN_PYTHON = True


# ---------------------------------------------------------------------------------------
# Sources: where the text comes from


@dataclass
class Source:
    kind: str  # "demo", "dir", "file" or "hub"
    spec: str  # what the user wrote
    files: dict[str, Path] | None = None  # local files by split ("text" for a single file)

    def fingerprint(self, cfg: DataConfig) -> str:
        """Changes whenever the text would: file contents, demo settings or the hub name."""
        h = hashlib.sha256(f"{CACHE_VERSION}|{self.kind}".encode())
        if self.kind == "demo":
            h.update(f"{DEMO_VERSION}|{cfg.demo_size}|{cfg.demo_seed}|{cfg.gap_min}|{cfg.gap_max}".encode())
        elif self.kind == "hub":
            h.update(self.spec.encode())
        else:
            for split, path in sorted(self.files.items()):
                h.update(split.encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        if self.kind in ("file", "hub"):
            h.update(f"{cfg.valid_fraction}|{cfg.test_fraction}".encode())
        return h.hexdigest()


def resolve_source(spec: str) -> Source:
    """Decide what a SOURCE string means, checking local files before any work is done."""
    path = Path(spec).expanduser()
    if spec == "demo" and not path.exists():
        return Source("demo", spec)
    if path.is_dir():
        # The first naming of which any file is there: train.txt, ... or wiki.train.tokens, ...
        names = next((n for n in SPLIT_FILES if any((path / f).is_file() for f in n.values())), SPLIT_FILES[0])
        files = {s: path / name for s, name in names.items()}
        missing = [p.name for p in files.values() if not p.is_file()]
        if missing:
            raise DataError(
                f"data directory {path} is missing {', '.join(missing)} (a directory needs train.txt, "
                "valid.txt and test.txt, or WikiText's wiki.train.tokens, wiki.valid.tokens and "
                "wiki.test.tokens; or pass a single text file)"
            )
        for p in files.values():
            check_file(p)
        return Source("dir", spec, files)
    if path.is_file():
        check_file(path)
        return Source("file", spec, {"text": path})
    if ":" in spec:  # "wikitext:wikitext-2-raw-v1", "org/name:config", "hf:org/name"
        return Source("hub", spec)
    raise DataError(
        f"data path {spec} does not exist (pass a directory with train.txt/valid.txt/test.txt, "
        "a text file, 'demo', or a hub dataset as NAME:CONFIG or hf:NAME)"
    )


def check_file(path: Path) -> None:
    """A readable, non-empty file, or a DataError that says which it is not."""
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path}: permission denied")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")


# For each split, a function that streams its lines (without their line endings) a
# block at a time; calling it again reads the split again.
Lines = Callable[[], Iterator[list[str]]]


def read_source(source: Source, cfg: DataConfig) -> dict[str, Lines]:
    """Each split's lines, streamed (see `Lines`)."""
    if source.kind == "demo":
        splits = demo_splits(cfg.demo_size, cfg.demo_seed, cfg.gap_min, cfg.gap_max)
        return {s: partial(iter, [lines]) for s, lines in splits.items()}
    if source.kind == "hub":
        return _hub_lines(source.spec, cfg)
    if source.kind == "dir":
        return {s: partial(file_blocks, path) for s, path in source.files.items()}
    path = source.files["text"]
    n = sum(len(block) for block in file_blocks(path))
    return {s: partial(file_blocks, path, start, stop) for s, (start, stop) in split_bounds(n, cfg, str(path)).items()}


def file_blocks(path: Path, start: int = 0, stop: int | None = None) -> Iterator[list[str]]:
    """Lines start .. stop - 1 of a UTF-8 text file, without their endings, a block at a
    time. Lines end where str.splitlines() ends them, after "\r\n" and "\r" become "\n"
    (as `datasets`' text loader reads a file); a block is BLOCK_CHARS characters and the
    rest of the line they end in, so a line of any length is read whole."""
    i = 0
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n and \r read as \n
            while stop is None or i < stop:
                text = f.read(BLOCK_CHARS)
                if not text:
                    return
                lines = (text + f.readline()).splitlines()
                if i + len(lines) > start:
                    yield lines[max(start - i, 0) : None if stop is None else stop - i]
                i += len(lines)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: invalid byte at offset {_first_bad_utf8(path)}") from e


def _first_bad_utf8(path: Path) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in a file, or None if it decodes."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            offset += len(block)
    return None


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte offset {e.start} of a block: {e.reason})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def split_bounds(n: int, cfg: DataConfig, name: str) -> dict[str, tuple[int, int]]:
    """The line ranges of train, valid and test when one text of `n` lines is cut by
    the config's fractions (train first, then valid, then test)."""
    n_valid, n_test = round(n * cfg.valid_fraction), round(n * cfg.test_fraction)
    n_train = n - n_valid - n_test
    if min(n_train, n_valid, n_test) < 1:
        raise DataError(
            f"{name} has {n} lines, too few to split into train/valid/test by the fractions "
            f"{cfg.valid_fraction}/{cfg.test_fraction} (give it more lines or a directory of splits)"
        )
    return {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n)}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hugging Face hub ($HF_ENDPOINT)?"""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_lines(spec: str, cfg: DataConfig) -> dict[str, Lines]:
    name, _, config = spec.removeprefix("hf:").partition(":")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()
    if offline:
        # Without this, huggingface_hub retries for half a minute before giving up; offline
        # it answers from the local cache at once (read when the hub libraries are imported).
        os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config or None)  # Arrow files, memory-mapped
    except Exception as e:
        why = "the hub is unreachable and it is not in the local cache" if offline else _root_cause(e)[:200]
        raise DataError(
            f"could not load hub dataset {spec!r} ({why}); without network, pass local files "
            "instead: --data DIR (with train.txt, valid.txt, test.txt) or --data FILE.txt"
        ) from e
    column = next((c for c, f in ds["train"].features.items() if getattr(f, "dtype", "") == "string"), None)
    if column is None:
        raise DataError(f"hub dataset {spec!r} has no text column")

    def rows(table, start: int, stop: int) -> Iterator[list[str]]:
        for i in range(start, stop, BLOCK_LINES):
            yield [t.rstrip("\n") for t in table[i : min(i + BLOCK_LINES, stop)][column]]

    aliases = {"valid": ("validation", "valid", "dev"), "test": ("test",)}
    found = {split: next((n for n in names if n in ds), None) for split, names in aliases.items()}
    if None in found.values():  # a split the hub does not have: carve all three out of train
        bounds = split_bounds(len(ds["train"]), cfg, spec)
        return {s: partial(rows, ds["train"], start, stop) for s, (start, stop) in bounds.items()}
    return {
        "train": partial(rows, ds["train"], 0, len(ds["train"])),
        **{s: partial(rows, ds[n], 0, len(ds[n])) for s, n in found.items()},
    }


# ---------------------------------------------------------------------------------------
# Tokenizers


def build_tokenizer(cfg: DataConfig, train_lines: Iterable[str], progress=None) -> Tokenizer:
    """A word, char or BPE tokenizer whose vocabulary comes from the train split only,
    read once, as a stream of lines. `progress(n)`, if given, is told the tokens counted."""
    normalizer = normalizers.Lowercase() if cfg.lowercase else None
    if cfg.tokenizer == "word":
        pre = pre_tokenizers.WhitespaceSplit()
        if cfg.split_punctuation:
            pre = pre_tokenizers.Sequence([pre, pre_tokenizers.Punctuation("isolated")])
    elif cfg.tokenizer == "char":
        pre = pre_tokenizers.Split(Regex("."), "isolated")  # every character is a token
    else:
        pre = pre_tokenizers.Metaspace()

    if cfg.tokenizer == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tok.train_from_iterator(_without_specials(train_lines), trainer=trainer)
    else:
        # Counted here rather than with WordLevelTrainer, which gives a corpus word that
        # equals a special token (PTB's literal "<unk>") a second id.
        counts = count_tokens(train_lines, cfg.tokenizer, normalizer, pre, progress)
        kept = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if c >= cfg.min_freq]
        if cfg.max_size is not None:
            kept = kept[: cfg.max_size - len(SPECIAL_TOKENS)]
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + kept)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre
        if cfg.tokenizer == "char":
            tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)  # "<unk>"/"<eos>" in the text map to their ids
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise DataError("the train split has no tokens to build a vocabulary from")
    return tok


def count_tokens(lines: Iterable[str], kind: str, normalizer, pre, progress=None) -> Counter[str]:
    """How often each word ("word") or character ("char") occurs in the lines, the
    special tokens left out. Many lines are joined with "\n" and pre-tokenized in one
    call: both pre-tokenizers cut at a line break as at a line's end."""
    counts: Counter[str] = Counter()
    plain = PLAIN_WORDS_IN_PYTHON and kind == "word" and isinstance(pre, pre_tokenizers.WhitespaceSplit)
    for block in _chunks(lines, BLOCK_LINES):
        text = "\n".join(block)
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        if plain and not _has_odd_space(text):  # str.split is WhitespaceSplit, in less time
            words = text.replace(UNK, " ").replace(EOS, " ").split()
            counts.update(words)
            n = len(words)
        else:
            before = counts.total()
            for piece in _SPECIAL_RE.split(text):
                if not piece or piece in SPECIAL_TOKENS:
                    continue
                if kind == "char":
                    counts.update(piece)  # Counter counts a string's characters in C
                else:
                    counts.update(w for w, _ in pre.pre_tokenize_str(piece))
            counts.pop("\n", None)  # the joins, not characters of any line
            n = counts.total() - before
        if progress is not None:
            progress(n)
    return counts


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _without_specials(lines: Iterable[str]):
    for line in lines:
        yield _SPECIAL_RE.sub(" ", line)


def encode_lines(tok: Tokenizer, lines: list[str]) -> np.ndarray:
    """Flat token ids with <eos> after every line, in the smallest integer type that fits."""
    return line_encoder(tok)(lines)


def line_encoder(tok: Tokenizer) -> Callable[[list[str]], np.ndarray]:
    """`encode_lines` for one tokenizer, set up once for many blocks of lines.

    The plain word tokenizer (a WordLevel vocabulary over whitespace-separated words,
    as for PTB and WikiText) is encoded here with str.split and a dict look-up, in less
    time than through `tokenizers` and with the same ids: Python's whitespace is
    WhitespaceSplit's except for the characters \x1c-\x1f, and a block holding one of
    them goes through `tokenizers`. Any other tokenizer always does.
    """
    dtype, eos = smallest_uint(tok.get_vocab_size()), tok.token_to_id(EOS)

    def through_tokenizers(lines: list[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in tok.encode_batch_fast(lines, add_special_tokens=False):  # ids, no offsets
            ids.extend(enc.ids)
            ids.append(eos)
        return np.asarray(ids, dtype=dtype)

    plain = (
        PLAIN_WORDS_IN_PYTHON
        and isinstance(tok.model, models.WordLevel)
        and isinstance(tok.pre_tokenizer, pre_tokenizers.WhitespaceSplit)
        and (tok.normalizer is None or isinstance(tok.normalizer, normalizers.Lowercase))
    )
    if not plain:
        return through_tokenizers
    lookup, unk = tok.get_vocab().get, tok.token_to_id(UNK)

    def encode(lines: list[str]) -> np.ndarray:
        text = f" {EOS} ".join(lines) + f" {EOS}" if lines else ""
        if _has_odd_space(text):
            return through_tokenizers(lines)
        # Special tokens are matched in the text as it is, before normalizing, and cut
        # out of the words around them, as `tokenizers` does with added tokens.
        text = text.replace(UNK, f" {UNK} ").replace(EOS, f" {EOS} ")
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        words = text.split()
        return np.fromiter(map(lookup, words, itertools.repeat(unk)), dtype=dtype, count=len(words))

    return encode


def _has_odd_space(text: str) -> bool:
    return any(c in text for c in _ODD_SPACE)


def smallest_uint(vocab_size: int):
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    return np.int64


def detokenize(tok: Tokenizer, ids: list[int], kind: str) -> str:
    """Token ids back to text: words joined by spaces, punctuation attached, chars fused."""
    if kind == "word":
        out = ""
        for i in ids:
            w = tok.id_to_token(i)
            if w == EOS:
                w = "\n"
            glue = not out or out.endswith("\n") or w == "\n" or re.fullmatch(r"[.,!?;:%)\]}']+", w)
            out += w if glue else " " + w
        return out
    return tok.decode([i for i in ids if tok.id_to_token(i) != EOS], skip_special_tokens=False)


# ---------------------------------------------------------------------------------------
# The whole pipeline, cached


@dataclass
class Corpus:
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]  # flat token ids per split
    source: Source

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LSTM_LM_CACHE") or Path.home() / ".cache" / "lstm-lm")


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None, source: str | None = None) -> Corpus:
    """Read, tokenize and encode a corpus, reusing cached ids when the inputs are unchanged.

    With `tokenizer` given (evaluating a checkpoint) the text is encoded with it;
    otherwise a tokenizer is built from the train split as `cfg` says. The splits come
    back memory-mapped from the cache's id files.
    """
    src = resolve_source(source or cfg.source)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    fingerprint = src.fingerprint(cfg)
    settings = json.dumps(
        [cfg.tokenizer, cfg.lowercase, cfg.split_punctuation, cfg.min_freq, cfg.max_size, cfg.vocab_size]
    )
    tok_path = cache / "tokenizers" / f"{_sha(fingerprint + settings)}.json"
    lines = None
    if tokenizer is None:
        if tok_path.is_file():
            tokenizer = Tokenizer.from_file(str(tok_path))
        else:
            lines = read_source(src, cfg)
            log(f"building a {cfg.tokenizer} tokenizer from the train split of {src.spec} ...")
            with progress_bar(None, f"counting {cfg.tokenizer}s in train", unit="tok") as bar:
                tokenizer = build_tokenizer(cfg, itertools.chain.from_iterable(lines["train"]()), bar)
            write_text(tok_path, tokenizer.to_str())

    ids_dir = cache / "ids" / _sha(fingerprint + tokenizer.to_str())
    meta_path = ids_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log(f"using cached token ids from {ids_dir} (no tokenization needed)")
    else:
        lines = lines or read_source(src, cfg)
        log(f"tokenizing {src.spec} into {ids_dir} ...")
        meta = {"dtype": np.dtype(smallest_uint(tokenizer.get_vocab_size())).name, "tokens": {}, "lines": {}}
        encode = line_encoder(tokenizer)
        for split in SPLITS:
            with progress_bar(None, f"tokenizing {split}", unit="tok") as bar:

                def write(tmp: Path, split=split, bar=bar) -> None:
                    meta["tokens"][split], meta["lines"][split] = encode_to_file(encode, lines[split](), tmp, bar)

                write_atomically(ids_dir / f"{split}.bin", write)
        meta["train_text"] = meta["tokens"]["train"] > meta["lines"]["train"]  # a token besides the lines' <eos>
        write_json(meta_path, meta)  # last: the mark of a whole cache
        log(f"cached token ids in {ids_dir}")
    if not meta["train_text"]:
        raise DataError(f"{src.spec}: the train split holds no text")
    splits = {s: open_ids(ids_dir / f"{s}.bin", meta["dtype"], meta["tokens"][s]) for s in SPLITS}
    return Corpus(tokenizer, splits, src)


def encode_to_file(
    encode: Callable[[list[str]], np.ndarray], blocks: Iterable[list[str]], path: Path, progress=None
) -> tuple[int, int]:
    """Encode the lines block by block with `encode` (a `line_encoder`), appending the ids
    to `path`; returns how many ids were written and how many lines they came from."""
    n, lines = 0, 0
    with open(path, "wb") as f:
        for block in blocks:
            for chunk in _chunks(block, BLOCK_LINES):
                ids = encode(chunk)
                ids.tofile(f)
                n, lines = n + ids.size, lines + len(chunk)
                if progress is not None:
                    progress(ids.size)
    return n, lines


def open_ids(path: Path, dtype: str, n: int) -> np.ndarray:
    """A split's ids, memory-mapped read-only (a file of no ids cannot be mapped)."""
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------
# Truncated-BPTT batches


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) ids -> (N // B, B): B parallel streams, each a contiguous stretch of the text.

    Stream b reads column b from top to bottom, so the hidden state of row t can be
    carried to row t + 1 across chunk boundaries. The last N % B tokens are dropped.
    """
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


class Streams:
    """What `batchify` makes, (T, B) streams of a flat id array, without copying the array:
    the ids stay where they are (the cache's memory-mapped file) and the rows a batch
    needs are gathered from it when it asks, as int64 on the device.

        train = Streams(corpus.splits["train"], 20, device)   # batchify(to_tensor(ids), 20), lazily
        x, y = get_batch(train, i, bptt=35)                  # the same batches
        mine = train[:, 0:10]                                # some of the streams (a rank's share)

    Indexing rows (`data[i:j]`) returns a tensor; indexing all rows and some streams
    (`data[:, a:b]`) returns those streams, still lazy.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, device: torch.device | str = "cpu"):
        self.ids, self.rows = ids, len(ids) // batch_size
        self.starts = np.arange(batch_size, dtype=np.int64) * self.rows  # where each stream begins
        self.device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, len(self.starts))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.rows * len(self.starts)

    def __getitem__(self, key) -> torch.Tensor | Streams:
        if isinstance(key, tuple):  # data[:, a:b]
            rows, columns = key
            if rows != slice(None):
                raise IndexError("Streams take data[i:j] (rows) or data[:, a:b] (streams)")
            some = copy.copy(self)
            some.starts = self.starts[columns]
            return some
        start, stop, step = key.indices(self.rows)
        if step != 1:
            raise IndexError("Streams take contiguous rows")
        rows = np.arange(start, max(start, stop), dtype=np.int64)
        block = torch.from_numpy(self.ids[rows[:, None] + self.starts[None, :]].astype(np.int64))  # (T, B)
        if self.device.type == "cuda":  # a copy that does not wait for the GPU
            return block.pin_memory().to(self.device, non_blocking=True)
        return block.to(self.device)


def get_batch(data: torch.Tensor | Streams, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i .. i+bptt-1 as inputs and the rows one step later as targets, both (T, B)."""
    seq_len = min(bptt, data.size(0) - 1 - i)
    if isinstance(data, Streams):  # one gather for both
        rows = data[i : i + 1 + seq_len]
        return rows[:-1], rows[1:]
    return data[i : i + seq_len], data[i + 1 : i + 1 + seq_len]


def to_tensor(ids: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(ids.astype(np.int64)).to(device)
