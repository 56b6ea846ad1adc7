"""Scoring texts: the log-probability a model gives each one, as a sentence of its own.

    results = score_texts(model, tokenizer, "word", ["the cat sat on the mat", "mat the on sat cat the"])
    # [{"text": ..., "tokens": 7, "logprob": -23.1, "perplexity": 27.2, "unknown": 0}, ...]

Each text is read after an `<eos>` and scored up to and including the `<eos>` that
ends it, as every line of the training text was (and as KenLM's `query` scores a
line with its `</s>`): `tokens` counts the text's tokens and that `<eos>`, and
`perplexity` is exp(-logprob / tokens). Texts are scored independently, with the
memory starting empty, so a text's score never depends on its neighbours.

Batched: the texts are sorted by length and read B at a time by the fused kernel,
padded at the end (the recurrence only looks back, so padding never changes a real
token's score), and only the real tokens go through the output layer.

Any length: a text of more than LONG_TEXT_CHARS characters is read in pieces cut at
spaces, and scored in windows of WINDOW tokens with the memory carried from window to
window, which gives the scores of reading it whole, in memory that does not grow with
the text (`score_stream`; `read_texts` hands such a line of a file over in pieces,
never whole). Its result's `text` is then its first TEXT_SHOWN characters, with
`text_cut: true`, when it is read from a file.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lstm_lm.data import EOS, UNK, check_file
from lstm_lm.errors import DataError
from lstm_lm.model import LSTMLanguageModel

# Padded tokens per batch: enough rows for the matrix products to run at full speed,
# few enough that a batch's activations stay small.
BATCH_TOKENS = 8192
LONG_TEXT_CHARS = 1 << 16  # longer texts are read in pieces of about this size and scored in windows
WINDOW = 4096  # tokens per window of a long text
TEXT_SHOWN = 200  # characters of a long line of a file kept for its result's `text`
_SPACE = re.compile(r"\s")


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """<eos> + the text's ids + <eos>: the model reads all but the last and predicts all but the first."""
    eos = tokenizer.token_to_id(EOS)
    return [eos, *tokenizer.encode(text.strip(), add_special_tokens=False).ids, eos]


def text_pieces(text: str, size: int = LONG_TEXT_CHARS) -> Iterator[str]:
    """`text` cut into pieces of about `size` characters, each cut at a space (a word is
    never split, and the pieces' tokens are the text's tokens)."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            space = _SPACE.search(text, end)  # the piece ends at the next space
            end = space.start() if space else len(text)
        yield text[start:end]
        start = end


@dataclass
class LongText:
    """A text too long to hold: its first characters, and its pieces, read as they are needed."""

    head: str
    pieces: Iterator[str]


@torch.no_grad()
def score_texts(
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    per_token: bool = False,
    batch_tokens: int = BATCH_TOKENS,
) -> list[dict]:
    """For each text, in order: `text`, `tokens`, `logprob` (natural log), `perplexity`,
    `unknown` (tokens read as `<unk>`) and, with `per_token`, `token_logprobs`: a
    [token, logprob] pair per token, the final `<eos>` included."""
    texts = list(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= LONG_TEXT_CHARS]
    encoded = {i: encode_text(tokenizer, texts[i]) for i in short}
    model.eval()
    scores: dict[int, torch.Tensor] = {}
    for batch in _batches([encoded[i] for i in short], batch_tokens):
        for j, row in zip(batch, _score_batch(model, [encoded[short[j]] for j in batch])):
            scores[short[j]] = row
    unk = tokenizer.token_to_id(UNK)
    results = []
    for i, text in enumerate(texts):
        if i not in encoded:  # a long text: in windows
            results.append({"text": text} | score_stream(model, tokenizer, text_pieces(text), per_token))
            continue
        targets, lp = encoded[i][1:], scores[i]
        pairs = _pairs(tokenizer, targets, lp.tolist()) if per_token else None
        results.append(
            {"text": text} | _result(len(targets), float(lp.double().sum()), sum(t == unk for t in targets), pairs)
        )
    return results


def _result(tokens: int, logprob: float, unknown: int, pairs: list[list] | None) -> dict:
    """One text's scores (without its `text`), however it was read."""
    out = {
        "tokens": tokens,
        "logprob": logprob,
        "perplexity": math.exp(min(-logprob / tokens, 700.0)),
        "unknown": unknown,
    }
    if pairs is not None:
        out["token_logprobs"] = pairs
    return out


def _pairs(tokenizer: Tokenizer, targets: list[int], logprobs: list[float]) -> list[list]:
    """[token, logprob] for each target."""
    return [[tokenizer.id_to_token(i), v] for i, v in zip(targets, logprobs)]


@torch.no_grad()
def score_stream(
    model: LSTMLanguageModel, tokenizer: Tokenizer, pieces: Iterable[str], per_token: bool = False, window: int = WINDOW
) -> dict:
    """Score one text given as pieces (cut at spaces), as score_texts scores a text: read
    in windows of `window` tokens with the memory carried, so that memory does not grow
    with the text (but for `per_token`'s list). Returns the result without its `text`."""
    model.eval()
    device = model.embedding.weight.device
    eos, unk = tokenizer.token_to_id(EOS), tokenizer.token_to_id(UNK)
    pending = [eos]  # the last token read, then the tokens still to score
    state = None
    total, n, unknown = 0.0, 0, 0
    pairs: list[list] | None = [] if per_token else None

    def read(count: int) -> None:  # score pending[1:count + 1], each from what precedes it
        nonlocal pending, state, total, n, unknown
        ids = torch.tensor(pending[: count + 1], device=device)[:, None]  # (count + 1, 1)
        out, state = model.features(ids[:-1], state)
        lp = model.target_log_probs(out[:, 0], ids[1:, 0]).cpu()
        targets = pending[1 : count + 1]
        total += float(lp.double().sum())
        n, unknown = n + count, unknown + sum(i == unk for i in targets)
        if pairs is not None:
            pairs.extend(_pairs(tokenizer, targets, lp.tolist()))
        pending = pending[count:]

    first = True
    for piece in pieces:
        piece = piece.lstrip() if first else piece
        if piece.strip():
            first = False
            pending.extend(tokenizer.encode(piece.strip(), add_special_tokens=False).ids)
        while len(pending) > window:
            read(window)
    pending.append(eos)
    read(len(pending) - 1)
    return _result(n, total, unknown, pairs)


def _batches(encoded: list[list[int]], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of the texts, longest first, in groups whose padded size fits `batch_tokens`."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batch: list[int] = []
    for i in order:
        if batch and len(encoded[batch[0]]) * (len(batch) + 1) > batch_tokens:  # the first is the longest
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _score_batch(model: LSTMLanguageModel, rows: list[list[int]]) -> list[torch.Tensor]:
    """Per-token log-probabilities of each row's ids[1:] given what precedes them."""
    device = model.embedding.weight.device
    lengths = torch.tensor([len(r) - 1 for r in rows])  # (B,) tokens to score in each
    T = int(lengths.max())
    ids = torch.zeros(T + 1, len(rows), dtype=torch.long)  # (T+1, B), padded at the end
    for b, r in enumerate(rows):
        ids[: len(r), b] = torch.tensor(r)
    ids = ids.to(device)
    out, _ = model.features(ids[:-1])  # (T, B, H)
    real = (torch.arange(T)[:, None] < lengths[None, :]).to(device)  # (T, B) the real tokens
    lp = model.target_log_probs(out[real], ids[1:][real]).cpu()
    cols = torch.zeros(T, len(rows), dtype=torch.float32)
    cols[real.cpu()] = lp
    return [cols[: int(n), b] for b, n in enumerate(lengths)]


def read_lines(path: str, block: int = 4096) -> Iterator[list[str] | LongText]:
    """The lines of a file (or of stdin for "-"), `block` at a time, checked before any
    is read: a missing, unreadable or empty file is a DataError. A line of more than
    LONG_TEXT_CHARS characters comes alone, as a LongText whose pieces are read from
    the file as they are scored (the lines before it come first)."""
    if path != "-":
        p = Path(path)
        if not p.exists():
            raise DataError(f"{path} does not exist")
        if not p.is_file():
            raise DataError(f"{path} is not a file")
        check_file(p)
    return _blocks_of_lines(path, block, sys.stdin)


def _blocks_of_lines(path: str, block: int, stdin) -> Iterator[list[str]]:
    f = stdin if path == "-" else open(path, encoding="utf-8")
    try:
        lines: list[str] = []
        try:
            while line := f.readline(LONG_TEXT_CHARS):
                if not line.endswith("\n") and len(line) == LONG_TEXT_CHARS:  # a long line: in pieces
                    if lines:
                        yield lines
                        lines = []
                    yield LongText(line[:TEXT_SHOWN], _rest_of_line(f, line))
                    continue
                lines.append(line.rstrip("\r\n"))
                if len(lines) == block:
                    yield lines
                    lines = []
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
        if lines:
            yield lines
    finally:
        if f is not stdin:
            f.close()


def _rest_of_line(f, first: str) -> Iterator[str]:
    """The pieces of a long line, `first` and then the rest of the line from `f`, each
    ending at a space (a word cut by a read is carried to the next piece)."""
    carry = first
    while True:
        more = f.readline(LONG_TEXT_CHARS)
        end = more.endswith("\n") or not more
        text = carry + more.rstrip("\r\n")
        if end:
            yield text
            return
        cut = max(text.rfind(" "), text.rfind("\t"))
        if cut <= 0:  # no space in the whole piece: one very long word, carried on
            carry = text
            continue
        yield text[:cut]
        carry = text[cut:]
