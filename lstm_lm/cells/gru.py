"""The gated recurrent unit (Cho et al. 2014), as torch.nn.GRU computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.cells.base import Cell, LayerState, Params


class GRU(Cell):
    """Two gates and no separate memory: the update gate keeps part of h as it is and
    replaces the rest with a candidate, which the reset gate lets read the old state.
    Parameters in torch.nn.GRU's order: reset, update, candidate (3 blocks of H rows)."""

    name = "gru"
    citation = (
        "Cho et al., Learning phrase representations using RNN encoder-decoder for statistical "
        "machine translation, EMNLP 2014"
    )
    summary = "gated recurrent unit: reset and update gates, no separate memory cell"
    title = "the GRU: its gates and state h"
    order, colour = 10, "#2ca02c"
    gate_names = ("reset", "update")
    kernel, torch_module = staticmethod(torch.gru), nn.GRU

    def shapes(self) -> dict[str, tuple[int, ...]]:
        H, I = self.hidden_size, self.input_size
        return {"weight_ih": (3 * H, I), "weight_hh": (3 * H, H), "bias_ih": (3 * H,), "bias_hh": (3 * H,)}

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        # b_hh stays apart: the reset gate scales the recurrent half of the candidate, bias included.
        return F.linear(x, p["weight_ih"], p["bias_ih"])

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        (h,) = state
        h_proj = torch.addmm(p["bias_hh"], h, p["weight_hh"].t())  # W_hh h + b_hh, (B, 3H)
        x_r, x_z, x_n = x_proj.chunk(3, dim=1)
        h_r, h_z, h_n = h_proj.chunk(3, dim=1)

        reset_gate = torch.sigmoid(x_r + h_r)  # how much of the old state the candidate may read
        update_gate = torch.sigmoid(x_z + h_z)  # how much of the old state to keep as it is
        candidate = torch.tanh(x_n + reset_gate * h_n)  # the new content proposed
        h = update_gate * h + (1 - update_gate) * candidate  # keep some, replace the rest
        if record is not None:
            record.update(reset=reset_gate, update=update_gate)
        return (h,)


CELL = GRU
