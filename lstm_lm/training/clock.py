"""The run's wall clock against its time budget.

clock = Clock(budget_min=30, elapsed_before=state.elapsed_s)
if clock.out_of_time(): ...   # the budget, less what the final evaluation needs, is spent
"""

from __future__ import annotations

import time


class Clock:
    """Wall time of the run (earlier sessions of a resumed run included) against its budget.

    The budget covers the final validation and test evaluation too: `reserve_s`, the
    time they are expected to take, is kept free. `time_reserve` sets it from a timed
    evaluation: a short probe before training, then each full validation.
    """

    def __init__(self, budget_min: float | None, elapsed_before: float = 0.0, start: float | None = None):
        self.budget_s = budget_min * 60 if budget_min else None
        self.before, self.start = elapsed_before, start if start is not None else time.perf_counter()
        self.reserve_s = 0.0
        self.expired = False

    def time_reserve(self, seconds: float, tokens: int, eval_tokens: int) -> None:
        """Evaluating `tokens` took `seconds`: reserve enough for `eval_tokens`, with a margin."""
        self.reserve_s = 1.2 * seconds * eval_tokens / max(tokens, 1) + 1.0

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def progress(self) -> float:
        """Share of the training time used, 0 -> 1 (under a budget)."""
        return self.elapsed() / max(self.budget_s - self.reserve_s, 1e-9)

    def out_of_time(self) -> bool:
        """Whether the budget, less the reserve, is spent. Once it is, it stays spent: a
        later, smaller estimate of the reserve does not restart training."""
        if self.budget_s is not None and self.elapsed() + self.reserve_s >= self.budget_s:
            self.expired = True
        return self.expired
