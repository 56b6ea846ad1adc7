"""Optimizers, learning-rate schedules and weight averaging for training.

    optimizer = make_optimizer(cfg, model)
    lr = scheduled_lr(cfg.train, base_lr, step, progress)   # progress: 0 -> 1 over the run
    average = WeightAverage(model)                           # NT-ASGD, once triggered
    average.update(); with average.swapped_in(): evaluate(...)

NT-ASGD (Merity et al. 2017) is SGD whose iterates are averaged from a point the
validation loss decides: averaging the weights of the last part of a run gives a
better model than its last weights, but starting too early drags in the poor
early ones. `nt_asgd_triggers` is the non-monotone criterion; `WeightAverage`
keeps the running mean of the weights, which is what torch.optim.ASGD keeps in its
`ax` state with lambd=0, without tying it to one optimizer class.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from lstm_lm.config import Config, TrainConfig


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def scheduled_lr(t: TrainConfig, base_lr: float, step: int, progress: float) -> float:
    """The learning rate of optimizer step `step` (0-based).

    `base_lr` is the current peak (t.lr, less any plateau decays); `progress` is the
    share of the run done, 0 to 1, in steps or in wall time under a time budget.
    Linear warm-up over t.warmup_steps, then for "cosine" half a cosine from base_lr
    down to t.min_lr at progress 1 (Loshchilov & Hutter 2017, without restarts).
    """
    if t.warmup_steps and step < t.warmup_steps:
        return base_lr * (step + 1) / t.warmup_steps
    if t.schedule != "cosine":
        return base_lr
    progress = min(max(progress, 0.0), 1.0)
    return t.min_lr + 0.5 * (base_lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def nt_asgd_triggers(val_losses: list[float], nonmono: int) -> bool:
    """The non-monotone trigger: the newest validation loss is worse than the best of
    all of them but the last `nonmono` (the test of Merity et al.'s code, given the
    history including the newest loss)."""
    if len(val_losses) <= nonmono + 1:
        return False
    return val_losses[-1] > min(val_losses[: -nonmono - 1])


class WeightAverage:
    """The running mean of a model's parameters over the optimizer steps since it was made."""

    def __init__(self, model: nn.Module, count: int = 0, averages: list[torch.Tensor] | None = None):
        self.params = [p for p in model.parameters()]
        self.count = count
        self.averages = averages or [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the current weights: avg += (w - avg) / n."""
        self.count += 1
        for avg, p in zip(self.averages, self.params):
            avg.lerp_(p, 1.0 / self.count)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its own again."""
        for avg, p in zip(self.averages, self.params):
            avg.data, p.data = p.data, avg.data
        try:
            yield
        finally:
            for avg, p in zip(self.averages, self.params):
                avg.data, p.data = p.data, avg.data
