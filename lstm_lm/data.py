"""Corpus -> tokenizer -> flat token-id arrays -> truncated-BPTT batches.

    corpus = load_corpus(cfg.data)                # tokenizer + {"train", "valid", "test"} id arrays
    data = batchify(torch.from_numpy(corpus.splits["train"]), batch_size=20)   # (T, B)
    x, y = get_batch(data, i, bptt=35)            # (bptt, B) inputs, next-token targets

Text files are read with `datasets.load_dataset("text", ...)`; tokenizers are
`tokenizers.Tokenizer` objects. Encoded splits are cached as `.npy` files keyed
by a hash of the input text and the tokenizer, so a second run on the same data
skips tokenization.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lstm_lm.config import DataConfig
from lstm_lm.demo import DEMO_VERSION, demo_splits
from lstm_lm.errors import DataError
from lstm_lm.utils import log, write_atomically, write_text

UNK, EOS = "<unk>", "<eos>"
SPECIAL_TOKENS = [UNK, EOS]  # ids 0 and 1 in every tokenizer
SPLITS = ("train", "valid", "test")
CACHE_VERSION = "1"  # bump when the encoding of a corpus changes
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


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
        files = {s: path / f"{s}.txt" for s in SPLITS}
        missing = [p.name for p in files.values() if not p.is_file()]
        if missing:
            raise DataError(
                f"data directory {path} is missing {', '.join(missing)} "
                "(a directory needs train.txt, valid.txt and test.txt; or pass a single text file)"
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


def read_source(source: Source, cfg: DataConfig) -> dict[str, list[str]]:
    """The text of each split, one string per line."""
    if source.kind == "demo":
        return demo_splits(cfg.demo_size, cfg.demo_seed, cfg.gap_min, cfg.gap_max)
    if source.kind == "hub":
        return _read_hub(source.spec, cfg)
    import datasets

    datasets.disable_progress_bars()
    files = {split: str(p) for split, p in source.files.items()}
    try:
        ds = datasets.load_dataset("text", data_files=files)
    except Exception as e:  # datasets wraps decode errors and the like in its own types
        for path in source.files.values():
            offset = _first_bad_utf8(path)
            if offset is not None:
                raise DataError(f"{path} is not UTF-8 text: invalid byte at offset {offset}") from e
        raise DataError(f"could not read {', '.join(files.values())}: {_root_cause(e)}") from e
    lines = {split: list(ds[split]["text"]) for split in ds}
    if source.kind == "file":
        return _split_lines(lines["text"], cfg, str(source.files["text"]))
    return lines


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


def _split_lines(lines: list[str], cfg: DataConfig, name: str) -> dict[str, list[str]]:
    n = len(lines)
    n_valid, n_test = round(n * cfg.valid_fraction), round(n * cfg.test_fraction)
    n_train = n - n_valid - n_test
    if min(n_train, n_valid, n_test) < 1:
        raise DataError(
            f"{name} has {n} lines, too few to split into train/valid/test by the fractions "
            f"{cfg.valid_fraction}/{cfg.test_fraction} (give it more lines or a directory of splits)"
        )
    return {
        "train": lines[:n_train],
        "valid": lines[n_train : n_train + n_valid],
        "test": lines[n_train + n_valid :],
    }


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hugging Face hub ($HF_ENDPOINT)?"""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_hub(spec: str, cfg: DataConfig) -> dict[str, list[str]]:
    name, _, config = spec.removeprefix("hf:").partition(":")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()
    if offline:
        # Without this, huggingface_hub retries for half a minute before giving up; offline
        # it answers from the local cache at once (read when the hub libraries are imported).
        os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:
        why = "the hub is unreachable and it is not in the local cache" if offline else _root_cause(e)[:200]
        raise DataError(
            f"could not load hub dataset {spec!r} ({why}); without network, pass local files "
            "instead: --data DIR (with train.txt, valid.txt, test.txt) or --data FILE.txt"
        ) from e
    column = next((c for c, f in ds["train"].features.items() if getattr(f, "dtype", "") == "string"), None)
    if column is None:
        raise DataError(f"hub dataset {spec!r} has no text column")
    aliases = {"valid": ("validation", "valid", "dev"), "test": ("test",)}
    out = {"train": [t.rstrip("\n") for t in ds["train"][column]]}
    for split, names in aliases.items():
        found = next((n for n in names if n in ds), None)
        if found is None:  # no such split on the hub: carve it out of train
            return _split_lines(out["train"], cfg, spec)
        out[split] = [t.rstrip("\n") for t in ds[found][column]]
    return out


# ---------------------------------------------------------------------------------------
# Tokenizers


def build_tokenizer(cfg: DataConfig, train_lines: list[str]) -> Tokenizer:
    """A word, char or BPE tokenizer whose vocabulary comes from the train split only."""
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
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
        tok.train_from_iterator(_without_specials(train_lines), trainer=trainer)
    else:
        # Counted here rather than with WordLevelTrainer, which gives a corpus word that
        # equals a special token (PTB's literal "<unk>") a second id.
        counts: Counter[str] = Counter()
        for line in train_lines:
            text = normalizer.normalize_str(line) if normalizer else line
            for piece in _SPECIAL_RE.split(text):
                if piece and piece not in SPECIAL_TOKENS:
                    counts.update(w for w, _ in pre.pre_tokenize_str(piece))
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


def _without_specials(lines: list[str]):
    for line in lines:
        yield _SPECIAL_RE.sub(" ", line)


def encode_lines(tok: Tokenizer, lines: list[str]) -> np.ndarray:
    """Flat token ids with <eos> after every line, in the smallest integer type that fits."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(lines, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=smallest_uint(tok.get_vocab_size()))


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
    otherwise a tokenizer is built from the train split as `cfg` says.
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
            log(f"reading {src.spec} ...")
            lines = read_source(src, cfg)
            log(f"building a {cfg.tokenizer} tokenizer from the train split ...")
            tokenizer = build_tokenizer(cfg, lines["train"])
            write_text(tok_path, tokenizer.to_str())

    ids_dir = cache / "ids" / _sha(fingerprint + tokenizer.to_str())
    if all((ids_dir / f"{s}.npy").is_file() for s in SPLITS):
        splits = {s: np.load(ids_dir / f"{s}.npy") for s in SPLITS}
        log(f"using cached token ids from {ids_dir} (no tokenization needed)")
    else:
        if lines is None:
            log(f"reading {src.spec} ...")
            lines = read_source(src, cfg)
        log(f"tokenizing {sum(len(v) for v in lines.values()):,} lines ...")
        splits = {s: encode_lines(tokenizer, lines[s]) for s in SPLITS}
        ids_dir.mkdir(parents=True, exist_ok=True)
        for s, arr in splits.items():
            write_atomically(ids_dir / f"{s}.npy", lambda tmp, arr=arr: _save_npy(tmp, arr))
        log(f"cached token ids in {ids_dir}")
    eos = tokenizer.token_to_id(EOS)
    if not np.any(splits["train"] != eos):
        raise DataError(f"{src.spec}: the train split holds no text")
    return Corpus(tokenizer, splits, src)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add .npy to a name
        np.save(f, arr)


# ---------------------------------------------------------------------------------------
# Truncated-BPTT batches


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) ids -> (N // B, B): B parallel streams, each a contiguous stretch of the text.

    Stream b reads column b from top to bottom, so the hidden state of row t can be
    carried to row t + 1 across chunk boundaries. The last N % B tokens are dropped.
    """
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


def get_batch(data: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i .. i+bptt-1 as inputs and the rows one step later as targets, both (T, B)."""
    seq_len = min(bptt, data.size(0) - 1 - i)
    return data[i : i + seq_len], data[i + 1 : i + 1 + seq_len]


def to_tensor(ids: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(ids.astype(np.int64)).to(device)
