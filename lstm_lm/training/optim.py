"""Optimizers, the learning-rate policy and weight averaging for training.

    optimizer = make_optimizer(cfg, model)
    policy = LearningRate(cfg.train, clock, total_steps)
    policy.set(state, optimizer, chunk)        # before each step: state.lr, the optimizer's rate
    policy.after_epoch(state, improved, averaging)
    average = WeightAverage(model)             # NT-ASGD, once triggered
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
from typing import TYPE_CHECKING

import torch
from torch import nn

from lstm_lm.config import Config, TrainConfig
from lstm_lm.training.clock import Clock
from lstm_lm.utils import log

if TYPE_CHECKING:
    from lstm_lm.training.training_state import TrainState


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


class LearningRate:
    """The one learning-rate policy of a run: linear warm-up, then constant, plateau
    (divided by lr_decay when validation got worse), exponential (divided every epoch
    from decay_start) or cosine over the run, where the run is its steps or, under a
    time budget, its clock; a longer variable-BPTT chunk takes a proportionally longer
    step. Its numbers live in the TrainState (lr, lr_peak, lr_set), saved with it.
    """

    def __init__(self, t: TrainConfig, clock: Clock, total_steps: int):
        self.t, self.clock, self.total_steps = t, clock, total_steps

    def progress(self, step: int) -> float:
        """How far through the run, 0 -> 1: the cosine's clock."""
        if self.t.time_budget:
            return self.clock.progress()
        return step / (self.t.max_steps or self.total_steps)

    def set(self, state: TrainState, optimizer: torch.optim.Optimizer, chunk: int) -> None:
        """The rate of the next step, into `state.lr` and the optimizer."""
        t = self.t
        state.lr = scheduled_lr(t, state.lr_peak, state.step, self.progress(state.step))
        for group in optimizer.param_groups:
            group["lr"] = state.lr * chunk / t.bptt if t.variable_bptt else state.lr

    def after_epoch(self, state: TrainState, improved: bool, averaging: bool) -> None:
        """At the end of a whole epoch: anneal on a plateau (not while NT-ASGD averages),
        or decay every epoch."""
        t = self.t
        if t.schedule == "plateau" and not improved and t.lr_decay > 1 and not averaging:
            state.lr_peak /= t.lr_decay
        if t.schedule == "exponential" and state.epoch >= t.decay_start:
            state.lr_peak /= t.lr_decay  # Zaremba et al. 2014: a fixed decay every epoch

    def below_stop_lr(self, state: TrainState) -> bool:
        """The decays have taken the rate below train.stop_lr."""
        return self.t.stop_lr is not None and state.lr_peak < self.t.stop_lr

    def spent(self, state: TrainState) -> bool:
        """The rate is below train.stop_lr: the run is over (and says so)."""
        if not self.below_stop_lr(state):
            return False
        log(
            f"the learning rate is {state.lr_peak:.4g}, below train.stop_lr {self.t.stop_lr:g}: training ends "
            "(--resume with a new --lr, or --set train.stop_lr=null, trains on)"
        )
        return True

    def resumed(self, state: TrainState) -> None:
        """A resume with another --lr than the run's sets the rate from here on."""
        if self.t.lr != state.lr_set:
            state.lr_peak = state.lr_set = self.t.lr
            log(f"learning rate set to {self.t.lr:g} from here on")


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

    @torch.no_grad()
    def _swap(self) -> None:
        # In place: the recurrent weights are views of one flat buffer (see model.py).
        for avg, p in zip(self.averages, self.params):
            own = p.clone()
            p.copy_(avg)
            avg.copy_(own)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its own again."""
        self._swap()
        try:
            yield
        finally:
            self._swap()
