"""The simple recurrent network (Elman 1990): the cell the LSTM was invented to improve on.

The smallest cell, and the example of docs/development.md: a module that declares
one `Cell` subclass named `CELL` is all it takes to add a cell.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lstm_lm.cells.base import Cell, LayerState, Params


class RNN(Cell):
    """The new state is a squashed mix of the input and the old state, rewritten whole at every step."""

    name = "rnn"
    citation = "Elman, Finding structure in time, Cognitive Science 1990"
    summary = "the simple tanh RNN, which forgets over long gaps (see lstm-lm experiment)"
    title = "the simple RNN: its state h"
    order, colour = 0, "#d62728"
    kernel, torch_module = staticmethod(torch.rnn_tanh), nn.RNN

    def shapes(self) -> dict[str, tuple[int, ...]]:
        H, I = self.hidden_size, self.input_size
        return {"weight_ih": (H, I), "weight_hh": (H, H), "bias_ih": (H,), "bias_hh": (H,)}

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        (h,) = state
        h = torch.tanh(torch.addmm(x_proj, h, p["weight_hh"].t()))  # tanh(W_ih x + b + W_hh h)
        return (h,)


CELL = RNN
