"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018): adapt the weights to the
text being scored, as it is read.

    settings = DynamicEval(lr=2e-4, decay=0.003, segment=20, rule="rms")
    stats = gradient_statistics(model, train_ids[:, None], settings.segment)   # for the rms rule
    log_probs = dynamic_log_probs(model, ids[:, None], settings, stats)        # (T - 1,)

The text is cut into segments of `segment` tokens. Each segment is scored first, with
the weights as they are, then one gradient step is taken on its loss, so a token's score
depends only on the text before it. The memory (h, c) carries from segment to segment.
Two update rules, each pulled back towards the trained weights theta_0 by `decay`:

    sgd: theta <- theta - lr * g + decay * (theta_0 - theta)
    rms: theta <- theta - lr * g / (sqrt(MS) + eps) + decay * r * (theta_0 - theta)

where MS is each weight's mean squared gradient over segments of the training text
(`gradient_statistics`), eps is 10% of the mean of sqrt(MS), and r = sqrt(MS) /
mean(sqrt(MS)), at most 1/decay: weights that training moved a lot may drift, the
others are held close (the paper's "RMS with a global prior").

It runs on one stream (batch 1): streams that shared the adapted weights would each be
adapted on the others' text, which lies later in the document, so a token's score would
depend on text after it. The model itself is never changed: the steps are taken on a copy.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from lstm_lm.evaluation.evaluate import perplexity_of
from lstm_lm.evaluation.protocols import DynamicEval
from lstm_lm.model import LSTMLanguageModel, detach_state
from lstm_lm.utils import autocast

# eps of the rms rule, as a share of the mean RMS: a weight whose gradient training never
# moved steps at most 10x the mean step. (10% gave valid 78.2 on a 2x300 PTB model where
# 1% gave 80.2 at its best step size, against 86.0 static; scripts/eval_techniques.py.)
EPS = 0.1
STATS_TOKENS = 20_000  # training tokens behind the rms rule's gradient statistics
TUNE_TOKENS = 40_000  # validation tokens each trial of the search reads


def _segments(ids: Tensor, segment: int):
    """(inputs, targets) pairs of at most `segment` tokens over a (T, 1) stream."""
    for i in range(0, ids.size(0) - 1, segment):
        n = min(segment, ids.size(0) - 1 - i)
        yield ids[i : i + n], ids[i + 1 : i + 1 + n]


def _log_probs(model: LSTMLanguageModel, x: Tensor, y: Tensor, state, precision: str):
    """log p(target) of each position of a segment (n,) float32, differentiable, and the new state."""
    with autocast(x.device, precision):
        h, state = model.features(x, detach_state(state))
        log_probs = model.target_log_probs(h.flatten(0, 1), y.flatten())
    return log_probs, state


def gradient_statistics(
    model: LSTMLanguageModel, ids: Tensor, segment: int, precision: str = "fp32", progress=None
) -> list[Tensor]:
    """Each parameter's mean squared gradient over segments of `ids` (T, 1), the training
    text, read as dynamic evaluation reads (dropout off, memory carried): the `MS` of the
    rms rule. The model's weights are not changed."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    sums = [torch.zeros_like(p) for p in params]
    state, n = model.init_state(1, ids.device), 0
    for x, y in _segments(ids, segment):
        log_probs, state = _log_probs(model, x, y, state, precision)
        grads = torch.autograd.grad(-log_probs.mean(), params, allow_unused=True, materialize_grads=True)
        for s, g in zip(sums, grads):
            s.addcmul_(g, g)
        n += 1
        if progress is not None:
            progress(y.numel())
    model.train(was_training)
    return [s / max(n, 1) for s in sums]


def dynamic_log_probs(
    model: LSTMLanguageModel,
    ids: Tensor,
    settings: DynamicEval,
    stats: list[Tensor] | None = None,
    precision: str = "fp32",
    progress=None,
) -> Tensor:
    """log p(target) of every position of `ids` (T, 1), each segment scored before the step
    it takes; (T - 1,) float32. `stats` (from gradient_statistics) is needed by the rms rule."""
    if ids.dim() != 2 or ids.size(1) != 1:
        raise ValueError(f"dynamic evaluation reads one stream: ids must be (T, 1), got {tuple(ids.shape)}")
    if settings.rule == "rms" and stats is None:
        raise ValueError("the rms rule needs the training text's gradient statistics (gradient_statistics)")
    adapted = copy.deepcopy(model).eval()  # the steps change the copy only
    params = [p for p in adapted.parameters()]
    start = [p.detach().clone() for p in params]  # theta_0
    if settings.rule == "rms":
        rms = [s.sqrt() for s in stats]
        mean_rms = torch.cat([r.flatten() for r in rms]).mean()
        step_scale = [1.0 / (r + EPS * mean_rms) for r in rms]
        pull = [(r / mean_rms).clamp(max=1.0 / settings.decay) if settings.decay > 0 else None for r in rms]
    out_parts = []
    state = adapted.init_state(1, ids.device)
    frozen = settings.lr == 0 and settings.decay == 0  # the static scores, step by step
    for x, y in _segments(ids, settings.segment):
        with torch.set_grad_enabled(not frozen):
            log_probs, state = _log_probs(adapted, x, y, state, precision)
        out_parts.append(log_probs.detach())  # the score, before this segment's step
        if progress is not None:
            progress(y.numel())
        if frozen:
            continue
        # (zeros for weights the segment did not reach: an adaptive softmax's cluster none of its words are in)
        grads = torch.autograd.grad(-log_probs.mean(), params, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            for i, (p, g, p0) in enumerate(zip(params, grads, start)):
                if settings.rule == "sgd":
                    p.add_(g, alpha=-settings.lr)
                    if settings.decay > 0:
                        p.add_(p0 - p, alpha=settings.decay)
                else:
                    p.addcmul_(g, step_scale[i], value=-settings.lr)
                    if settings.decay > 0:
                        p.addcmul_(p0 - p, pull[i], value=settings.decay)
    return torch.cat(out_parts)


# The search that `lstm-lm eval --dynamic --tune` runs on the validation split: the step
# size without decay, then the decay with the best step size (9 passes over the text).
TUNE_LRS = {"rms": (3e-5, 1e-4, 2e-4, 3e-4, 5e-4), "sgd": (0.1, 0.3, 1.0, 3.0, 10.0)}
TUNE_DECAYS = (0.001, 0.003, 0.01, 0.03)


def tune(
    model: LSTMLanguageModel,
    ids: Tensor,
    segment: int,
    rule: str,
    stats: list[Tensor] | None,
    precision: str = "fp32",
    progress=None,
) -> tuple[DynamicEval, list[dict]]:
    """The settings with the lowest perplexity on `ids` (T, 1), and every trial's result."""
    trials: list[dict] = []

    def trial(lr: float, decay: float) -> float:
        settings = DynamicEval(lr, decay, segment, rule)
        result = perplexity_of(dynamic_log_probs(model, ids, settings, stats, precision))
        trials.append(settings.to_dict() | result)
        if progress is not None:
            progress(1)
        return result["loss"]

    losses = {lr: trial(lr, 0.0) for lr in TUNE_LRS[rule]}
    lr = min(losses, key=losses.get)
    decays = {0.0: losses[lr]} | {d: trial(lr, d) for d in TUNE_DECAYS}
    return DynamicEval(lr, min(decays, key=decays.get), segment, rule), trials
