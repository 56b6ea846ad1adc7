"""The neural cache (Grave, Joulin & Usunier 2017): lower perplexity at evaluation time
by remembering which word followed each recent hidden state.

    cache = NeuralCache(window=2000, theta=0.3, lam=0.1)
    chunks = collect(model, batchify(ids, 1), bptt=35)      # one static pass: states, log p, targets
    log_probs = cache_log_probs(chunks, cache)[0]           # (N, B) with the cache mixed in

At position t the model's distribution p_vocab is mixed with a distribution over the
words that followed the last `window` hidden states h_j (j < t), each weighted by how
much it looks like the current one:

    p_cache(w) = sum over j with x_{j+1} = w of softmax_j(theta * h_t . h_j)
    p(w)       = (1 - lam) * p_vocab(w) + lam * p_cache(w)

h is the last layer's output, the input of the decoder. Only p(target) is needed for
perplexity, so each position computes its similarities to the keys and sums those whose
next word is the target; nothing of size V is built. The history lives on the device as
a ring buffer of `window` (h, next word) pairs per stream, and a whole chunk of
positions is scored at once: the keys are the ring plus the chunk itself, masked so that
position t sees exactly the `window` pairs before it (an empty cache leaves p_vocab alone).
Each stream keeps a cache of its own, so a token's score never depends on later text;
batch size 1 gives every token the longest history.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lstm_lm.evaluation.evaluate import feature_spans, perplexity_of
from lstm_lm.evaluation.protocols import NeuralCache
from lstm_lm.model import LSTMLanguageModel
from lstm_lm.utils import autocast


class CacheHistory:
    """A ring buffer of the last `window` (hidden state, next word) pairs of each of B streams."""

    def __init__(self, window: int, batch: int, hidden: int, device: torch.device):
        self.window = window
        self.keys = torch.zeros(window, batch, hidden, device=device)
        self.words = torch.zeros(window, batch, dtype=torch.long, device=device)
        self.index = torch.full((window,), -1, dtype=torch.long, device=device)  # each slot's position; -1: empty
        self.seen = 0  # positions written so far

    def add(self, h: Tensor, words: Tensor) -> None:
        """Append a chunk: h (T, B, H) and the words that followed each position (T, B)."""
        T = h.size(0)
        if T > self.window:  # only the last `window` of them can ever be read again
            h, words, start = h[-self.window :], words[-self.window :], self.seen + T - self.window
        else:
            start = self.seen
        slots = torch.arange(start, start + h.size(0), device=h.device) % self.window
        self.keys[slots] = h.float()
        self.words[slots] = words
        self.index[slots] = torch.arange(start, start + h.size(0), device=h.device)
        self.seen += T


def cache_probabilities(history: CacheHistory, h: Tensor, targets: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """p_cache(target) for each position of a chunk, before the chunk joins the history.

    h (T, B, H) and targets (T, B) -> (p (T, B), whether the cache held anything (T,)).
    Position t sees the ring's pairs no older than `window` and the chunk's pairs before t.
    """
    T, window = h.size(0), history.window
    pos = history.seen + torch.arange(T, device=h.device)  # each query's position
    keys = torch.cat([history.keys, h.float()])  # (W + T, B, H)
    words = torch.cat([history.words, targets])  # (W + T, B)
    key_pos = torch.cat([history.index, pos])  # (W + T,)
    visible = (key_pos[None, :] >= 0) & (key_pos[None, :] < pos[:, None]) & (key_pos[None, :] >= pos[:, None] - window)
    scores = theta * torch.einsum("tbh,kbh->btk", h.float(), keys)  # (B, T, W + T)
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(dim=1)  # (T,)
    attention = torch.softmax(scores.masked_fill(~any_visible[None, :, None], 0.0), dim=-1)
    same_word = words.t()[:, None, :] == targets.t()[:, :, None]  # (B, T, W + T): key's next word == target
    p = (attention * same_word).sum(-1).t()  # (T, B)
    return p * any_visible[:, None], any_visible


def mix(log_p_vocab: Tensor, p_cache: Tensor, has_cache: Tensor, lam: float) -> Tensor:
    """log((1 - lam) p_vocab + lam p_cache) where the cache held anything, else log p_vocab."""
    if lam == 0:
        return log_p_vocab
    keep = math.log1p(-lam) if lam < 1 else -math.inf
    mixed = torch.logaddexp(log_p_vocab + keep, torch.log(p_cache) + math.log(lam))
    return torch.where(has_cache[:, None], mixed, log_p_vocab)


@torch.no_grad()
def collect(model: LSTMLanguageModel, data: Tensor, bptt: int, precision: str = "fp32", progress=None):
    """One static pass over `data` (T, B): per chunk the last layer's output (T, B, H),
    the model's log p(target) (T, B) and the targets, as the cache needs them."""
    chunks = []
    for out, y in feature_spans(model, data, bptt, precision):  # the spans that evaluate() scores
        with autocast(data.device, precision):
            logp = model.target_log_probs(out.flatten(0, 1), y.flatten()).view_as(y)
        chunks.extend(zip(out.float().split(bptt), logp.split(bptt), y.split(bptt)))
        if progress is not None:
            progress(y.numel())
    return chunks


def cache_log_probs(chunks, cache: NeuralCache, lams: tuple[float, ...] | None = None) -> list[Tensor]:
    """Run the cache over collected chunks: the mixed log p(target) of every position, (N, B)
    for each lambda in `lams` (default: the cache's own), from one pass of the ring buffer."""
    lams = (cache.lam,) if lams is None else lams
    h0 = chunks[0][0]
    history = CacheHistory(cache.window, h0.size(1), h0.size(2), h0.device)
    out: list[list[Tensor]] = [[] for _ in lams]
    for h, logp, y in chunks:
        p, has = cache_probabilities(history, h, y, cache.theta)
        for i, lam in enumerate(lams):
            out[i].append(mix(logp, p, has, lam))
        history.add(h, y)
    return [torch.cat(parts) for parts in out]


# The search that `lstm-lm eval --cache --tune` runs on the validation split: every
# (window, theta) pair, each with every lambda (lambda costs nothing: it only mixes).
TUNE_WINDOWS = (100, 200, 500, 1000, 2000, 4000)
TUNE_THETAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
TUNE_LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)


def tune(
    chunks, windows=TUNE_WINDOWS, thetas=TUNE_THETAS, lams=TUNE_LAMBDAS, progress=None
) -> tuple[NeuralCache, list[dict]]:
    """The settings with the lowest perplexity on the collected chunks, and every trial's result."""
    trials = []
    for window in windows:
        for theta in thetas:
            for lam, logp in zip(lams, cache_log_probs(chunks, NeuralCache(window, theta, lams[0]), lams)):
                trials.append({"window": window, "theta": theta, "lambda": lam, **perplexity_of(logp)})
            if progress is not None:
                progress(1)
    best = min(trials, key=lambda r: r["loss"])
    return NeuralCache(best["window"], best["theta"], best["lambda"]), trials
