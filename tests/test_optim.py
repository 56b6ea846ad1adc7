"""Learning-rate schedules, the NT-ASGD trigger and the weight average."""

import math

import pytest
import torch
from torch import nn

from lstm_lm.config import TrainConfig
from lstm_lm.training.optim import WeightAverage, nt_asgd_triggers, scheduled_lr


def test_warmup_then_cosine_down_to_min_lr():
    t = TrainConfig(schedule="cosine", lr=2.0, min_lr=0.2, warmup_steps=4)
    assert [scheduled_lr(t, 2.0, s, 0.0) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert scheduled_lr(t, 2.0, 10, 0.0) == pytest.approx(2.0)
    assert scheduled_lr(t, 2.0, 10, 0.5) == pytest.approx(1.1)  # halfway: the mean of lr and min_lr
    assert scheduled_lr(t, 2.0, 10, 1.0) == pytest.approx(0.2)
    assert scheduled_lr(t, 2.0, 10, 1.7) == pytest.approx(0.2)  # past the plan: stays at the floor
    lrs = [scheduled_lr(t, 2.0, 10, p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_plateau_and_constant_keep_the_base_rate_after_warmup():
    for schedule in ("plateau", "constant"):
        t = TrainConfig(schedule=schedule, lr=1.0, warmup_steps=2)
        assert scheduled_lr(t, 0.25, 0, 0.9) == 0.125
        assert scheduled_lr(t, 0.25, 5, 0.9) == 0.25


def test_nt_asgd_triggers_when_worse_than_the_best_before_the_last_nonmono():
    assert not nt_asgd_triggers([3.0, 2.0, 2.5], nonmono=2)  # too short a history to judge
    assert not nt_asgd_triggers([3.0, 2.0, 1.9, 1.8, 1.7], nonmono=2)  # still improving
    assert not nt_asgd_triggers([3.0, 2.0, 2.1, 2.2, 1.9], nonmono=2)
    assert nt_asgd_triggers([3.0, 2.0, 1.5, 2.2, 2.1], nonmono=2)  # worse than min(3.0, 2.0)
    # Merity et al.: switch when len(history) > nonmono and loss > min(history[:-nonmono]),
    # history being the earlier losses.
    history, loss = [5.0, 4.0, 3.0, 3.5], 3.2
    assert nt_asgd_triggers(history + [loss], nonmono=2) == (len(history) > 2 and loss > min(history[:-2]))


def test_weight_average_is_the_mean_of_the_iterates_and_swaps_back():
    model = nn.Linear(3, 2)
    average = WeightAverage(model)
    seen = []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1.0)
        seen.append([p.detach().clone() for p in model.parameters()])
        average.update()
    own = [p.detach().clone() for p in model.parameters()]
    with average.swapped_in():
        for p, iterates in zip(model.parameters(), zip(*seen)):
            torch.testing.assert_close(p.detach(), torch.stack(iterates).mean(0))
    for p, o in zip(model.parameters(), own):
        assert torch.equal(p.detach(), o)
    assert average.count == 5 and not math.isnan(average.averages[0].sum().item())
