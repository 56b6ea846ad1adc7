"""Perplexity of a model on a split: the one function used by validation and `lstm-lm eval`
(through `LanguageModel.evaluate`).

    result = evaluate(model, batchify(ids, 10), bptt=35)
    # {"loss": ..., "perplexity": ..., "tokens": ..., "top1_accuracy": ..., "top5_accuracy": ...}

The protocol (docs/reference.md, "Evaluation protocol"): perplexity is exp of the mean negative
log-likelihood per token over the whole split, `<eos>` counted as a token, with the
hidden state carried from chunk to chunk through the split (each of the B streams
reads its stretch of the text; B = 1 gives every token the most context). Top-k
accuracy is the share of tokens whose true next token is among the model's k most
likely, what a keyboard's k next-word suggestions would get right.
"""

from __future__ import annotations

import math

import torch

from lstm_lm.data import Streams, get_batch
from lstm_lm.model import LSTMLanguageModel
from lstm_lm.utils import autocast

TOP_K = (1, 5)


# Tokens per call of the recurrent layers in an evaluation pass (a whole number of bptt
# chunks): without gradients the chunk length changes nothing but the number of calls,
# each of which pays the kernel's set-up (oneDNN casts and reorders the weights).
SPAN_TOKENS = 4096


def feature_spans(model: LSTMLanguageModel, data: torch.Tensor | Streams, bptt: int, precision: str = "fp32"):
    """The last layer's output (T, B, H) and the targets (T, B) of `data` (T, B), span by
    span, each span a whole number of `bptt` chunks and about SPAN_TOKENS tokens, the
    memory carried from span to span and dropout off: the one pass that evaluation and
    the neural cache read. The state a chunk starts from is the one the last chunk ended
    in, so the spans give each chunk what a chunk-by-chunk pass would. Call it under
    `torch.no_grad()`."""
    was_training = model.training
    model.eval()
    span = bptt * max(1, SPAN_TOKENS // (bptt * data.size(1)))
    try:
        state = model.init_state(data.size(1), data.device)
        for i in range(0, data.size(0) - 1, span):
            x, y = get_batch(data, i, span)
            with autocast(data.device, precision):
                out, state = model.features(x, state)
            yield out, y
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: LSTMLanguageModel, data: torch.Tensor | Streams, bptt: int, precision: str = "fp32"
) -> dict[str, float]:
    """Mean loss (nats per token), perplexity, token count and top-1/top-5 accuracy over `data` (T, B).

    precision "bf16" runs the matrix products in bf16; the loss is summed in float32/64.
    """
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    hits = torch.zeros(len(TOP_K), dtype=torch.long, device=data.device)
    tokens = 0
    # One autocast region for the whole pass: autocast casts each recurrent weight to bf16 once and
    # keeps the cast until the region ends, where a region per chunk would cast them all
    # again for every chunk (no weight changes within the pass).
    with autocast(data.device, precision):
        for out, y in feature_spans(model, data, bptt, precision):
            loss, found = model.output_loss_and_hits(out.flatten(0, 1), y.flatten(), TOP_K)
            total += loss
            hits += found
            tokens += y.numel()
    loss = total.item() / max(tokens, 1)  # one host sync for the whole split
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    for k, n in zip(TOP_K, hits.tolist()):
        result[f"top{k}_accuracy"] = n / max(tokens, 1)
    return result


def perplexity_of(log_probs: torch.Tensor) -> dict[str, float]:
    """Loss (mean negative log-likelihood, nats per token), perplexity and token count
    from per-token log-probabilities (the cache's and dynamic evaluation's scores)."""
    loss = -log_probs.double().mean().item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": log_probs.numel()}
