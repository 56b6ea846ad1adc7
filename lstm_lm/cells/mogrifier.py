"""The Mogrifier LSTM (Melis, Kočiský & Blunsom, Mogrifier LSTM, ICLR 2020).

Before each LSTM step the input x and the previous state h gate each other, for
`model.mogrify_rounds` rounds (the paper's 5 by default):

    round 1, 3, 5, ...   x = 2 sigmoid(Q_i h) * x     the context rescales the input
    round 2, 4, ...      h = 2 sigmoid(R_i x) * h     the input rescales the context

so that each word is read in the light of its context. Then an ordinary LSTM step
runs on the mogrified x and h. With `model.mogrify_rank` k, each Q_i (I, H) and
R_i (H, I) is the product of two matrices of rank k, as in the paper's low-rank
variant. With 0 rounds it is the LSTM. There is no fused kernel for it: both engines
run the step loop (compile it with train.compile).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.cells.base import LayerState, Params
from lstm_lm.cells.lstm import LSTM, LSTMLoop

DEFAULT_ROUNDS = 5  # the paper's setting on Penn Treebank and WikiText-2


class Mogrifier(LSTM):
    """An LSTM whose input and previous state gate each other for `mogrify_rounds` rounds first."""

    name = "mogrifier"
    citation = "Melis, Kočiský & Blunsom, Mogrifier LSTM, ICLR 2020"
    summary = (
        "Mogrifier LSTM: x and h gate each other for model.mogrify_rounds rounds before each LSTM step "
        "(model.mogrify_rank: low-rank Q and R)"
    )
    title = "the Mogrifier LSTM: its gates and memory c"
    order, colour = 40, "#ff7f0e"
    options = ("mogrify_rounds", "mogrify_rank")
    kernel = torch_module = None

    def __init__(
        self, input_size: int, hidden_size: int, mogrify_rounds: int = DEFAULT_ROUNDS, mogrify_rank: int | None = None
    ):
        super().__init__(input_size, hidden_size)
        if mogrify_rounds < 0:
            raise ValueError(f"mogrify_rounds must be >= 0, got {mogrify_rounds}")
        if mogrify_rank is not None and mogrify_rank < 1:
            raise ValueError(f"mogrify_rank must be >= 1, got {mogrify_rank}")
        self.rounds, self.rank = mogrify_rounds, mogrify_rank

    def shapes(self) -> dict[str, tuple[int, ...]]:
        I, H, k = self.input_size, self.hidden_size, self.rank
        n_q, n_r = math.ceil(self.rounds / 2), self.rounds // 2  # Q for the odd rounds, R for the even ones
        shapes = super().shapes()
        for name, n, rows, cols in (("mogrifier_q", n_q, I, H), ("mogrifier_r", n_r, H, I)):
            if n == 0:
                continue
            if k is None:
                shapes[name] = (n, rows, cols)
            else:
                shapes[f"{name}_left"], shapes[f"{name}_right"] = (n, rows, k), (n, k, cols)
        return shapes

    def reset_parameters(self, params: Params) -> None:
        super().reset_parameters(params)
        if self.rank is not None:  # each factor's share, so that the product has the full matrix's scale
            for name, p in params.items():
                if name.startswith("mogrifier"):
                    bound = (1.0 / math.sqrt(self.hidden_size)) ** 0.5 / self.rank**0.25
                    nn.init.uniform_(p, -bound, bound)

    def matrix(self, p: Params, name: str, i: int, v: Tensor) -> Tensor:
        """Q_i v or R_i v, v (B, cols) -> (B, rows), through the two factors when low-rank."""
        if self.rank is None:
            return F.linear(v, p[name][i])
        return F.linear(F.linear(v, p[f"{name}_right"][i]), p[f"{name}_left"][i])

    def mogrify(self, x: Tensor, h: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        for k in range(1, self.rounds + 1):
            if k % 2 == 1:
                x = 2 * torch.sigmoid(self.matrix(p, "mogrifier_q", k // 2, h)) * x  # the context rescales the input
            else:
                h = 2 * torch.sigmoid(self.matrix(p, "mogrifier_r", k // 2 - 1, x)) * h  # and the input the context
        return x, h

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        return x  # the input's projection waits for the mogrified x of each step

    def step(self, x: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        h, c = state
        x, h = self.mogrify(x, h, p)  # then an ordinary LSTM step on the mogrified x and h
        return super().step(super().project_input(x, p), (h, c), p, record)

    def full_matrices(self, p: Params, name: str) -> Tensor | None:
        if self.rank is None:
            return p.get(name)
        return p[f"{name}_left"] @ p[f"{name}_right"] if f"{name}_left" in p else None

    def export_layer(self, p: Params) -> nn.Module:
        weights = [p[name] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        q, r = (self.full_matrices(p, name) for name in ("mogrifier_q", "mogrifier_r"))
        return LSTMLoop(weights, 0, None if q is None else q.detach(), None if r is None else r.detach(), self.rounds)


CELL = Mogrifier
