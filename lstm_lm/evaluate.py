"""Perplexity of a model on a split: the one function used by validation and `lstm-lm eval`.

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
from pathlib import Path
from typing import Any

import torch

from lstm_lm.config import choices
from lstm_lm.data import batchify, get_batch, load_corpus, to_tensor
from lstm_lm.errors import ConfigError, DataError
from lstm_lm.loss import linear_cross_entropy_and_hits
from lstm_lm.model import LSTMLanguageModel
from lstm_lm.utils import autocast, pick_device, pick_precision

TOP_K = (1, 5)


@torch.no_grad()
def evaluate(model: LSTMLanguageModel, data: torch.Tensor, bptt: int, precision: str = "fp32") -> dict[str, float]:
    """Mean loss (nats per token), perplexity, token count and top-1/top-5 accuracy over `data` (T, B).

    precision "bf16" runs the matrix products in bf16; the loss is summed in float32/64.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    hits = torch.zeros(len(TOP_K), dtype=torch.long, device=data.device)
    tokens = 0
    state = model.init_state(data.size(1), data.device)
    for i in range(0, data.size(0) - 1, bptt):
        x, y = get_batch(data, i, bptt)
        with autocast(data.device, precision):
            out, state = model.features(x, state)
            loss, found = linear_cross_entropy_and_hits(out.flatten(0, 1), model.decoder.weight,
                                                        model.decoder.bias, y.flatten(), TOP_K)
        total += loss
        hits += found
        tokens += y.numel()
    model.train(was_training)
    loss = total.item() / max(tokens, 1)  # one host sync for the whole split
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    for k, n in zip(TOP_K, hits.tolist()):
        result[f"top{k}_accuracy"] = n / max(tokens, 1)
    return result


def evaluate_checkpoint(
    checkpoint: str | Path, source: str | None = None, split: str = "test",
    batch_size: int | None = None, device: str = "auto", precision: str | None = None,
) -> dict[str, Any]:
    """`lstm-lm eval`: load a checkpoint, encode `split` of its corpus (or `source`), evaluate."""
    from lstm_lm.checkpoint import load_checkpoint

    if split not in ("test", "valid"):
        raise DataError(f"--split must be test or valid, got {split!r}")
    if batch_size is not None and batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if precision is not None and precision not in choices("train.precision"):
        raise ConfigError([f"--precision must be one of {', '.join(choices('train.precision'))}, got {precision!r}"],
                          origin="command line")
    dev = pick_device(device)
    model, tokenizer, cfg = load_checkpoint(checkpoint, dev)
    try:
        corpus = load_corpus(cfg.data, tokenizer=tokenizer, source=source)
    except DataError as e:
        if source is not None:
            raise
        raise DataError(f"{e} (the corpus this model was trained on; pass --data to use another copy)") from None
    ids = corpus.splits[split]
    bsz = batch_size or cfg.train.eval_batch_size
    if len(ids) < 2 * bsz:
        raise DataError(f"the {split} split has {len(ids)} tokens, too few for batch size {bsz}")
    prec = pick_precision(precision or cfg.train.precision, dev)
    result = evaluate(model, batchify(to_tensor(ids, dev), bsz), cfg.train.bptt, prec)
    out: dict[str, Any] = {
        "split": split,
        "perplexity": result["perplexity"],
        "loss": result["loss"],
        "tokens": result["tokens"],
        "top1_accuracy": result["top1_accuracy"],
        "top5_accuracy": result["top5_accuracy"],
    }
    if cfg.data.tokenizer == "char":
        out["bits_per_char"] = result["loss"] / math.log(2)
    out |= {"batch_size": bsz, "bptt": cfg.train.bptt, "precision": prec, "data": corpus.source.spec,
            "checkpoint": str(Path(checkpoint))}
    return out
