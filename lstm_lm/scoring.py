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
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lstm_lm.data import EOS, UNK, check_file
from lstm_lm.errors import DataError, PromptError
from lstm_lm.model import LSTMLanguageModel
from lstm_lm.sample import MAX_PROMPT_TOKENS

# Padded tokens per batch: enough rows for the matrix products to run at full speed,
# few enough that a batch's activations stay small.
BATCH_TOKENS = 8192


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """<eos> + the text's ids + <eos>: the model reads all but the last and predicts all but the first."""
    eos = tokenizer.token_to_id(EOS)
    ids = tokenizer.encode(text.strip(), add_special_tokens=False).ids
    if len(ids) > MAX_PROMPT_TOKENS:
        raise PromptError(f"a text has {len(ids)} tokens; the limit is {MAX_PROMPT_TOKENS}: {text[:60]!r}...")
    return [eos, *ids, eos]


@torch.no_grad()
def score_texts(model: LSTMLanguageModel, tokenizer: Tokenizer, texts: Iterable[str], per_token: bool = False,
                batch_tokens: int = BATCH_TOKENS) -> list[dict]:
    """For each text, in order: `text`, `tokens`, `logprob` (natural log), `perplexity`,
    `unknown` (tokens read as `<unk>`) and, with `per_token`, `token_logprobs`: a
    [token, logprob] pair per token, the final `<eos>` included."""
    texts = list(texts)
    encoded = [encode_text(tokenizer, t) for t in texts]
    model.eval()
    scores: list[torch.Tensor | None] = [None] * len(texts)
    for batch in _batches(encoded, batch_tokens):
        for i, row in zip(batch, _score_batch(model, [encoded[i] for i in batch])):
            scores[i] = row
    unk = tokenizer.token_to_id(UNK)
    results = []
    for text, ids, lp in zip(texts, encoded, scores):
        total = float(lp.double().sum())
        n = len(ids) - 1
        out = {"text": text, "tokens": n, "logprob": total, "perplexity": math.exp(min(-total / n, 700.0)),
               "unknown": sum(i == unk for i in ids[1:])}
        if per_token:
            out["token_logprobs"] = [[tokenizer.id_to_token(i), v] for i, v in zip(ids[1:], lp.tolist())]
        results.append(out)
    return results


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


def read_lines(path: str, block: int = 4096) -> Iterator[list[str]]:
    """The lines of a file (or of stdin for "-"), `block` at a time, checked before any
    is read: a missing, unreadable or empty file is a DataError."""
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
            for line in f:
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
