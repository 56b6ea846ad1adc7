"""The minimal GRU (Feng et al., Were RNNs all we needed?, 2024).

The GRU with its gates' dependence on h_{t-1} removed, and the reset gate with it:

    z_t = sigmoid(W_z x_t + b_z)              update gate, from the input alone
    h~_t = g(W_h x_t + b_h)                    candidate, from the input alone
    h_t = (1 - z_t) * h_{t-1} + z_t * h~_t     keep some, replace the rest

with g(x) = x + 1/2 for x >= 0 and sigmoid(x) below, the paper's positive candidate of
its log-space form. Since nothing on the right reads h_{t-1} but the last line, the
recurrence is linear, h_t = a_t h_{t-1} + b_t with a_t = 1 - z_t and b_t = z_t h~_t:
a whole chunk's gates come from one matrix product, then the recurrence runs over time
(scan.py), as a parallel scan in log space or, on a CPU, step by step. Generation runs
the step. No fused kernel: that is the fast path of both engines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lstm_lm.cells.base import LayerState, Params
from lstm_lm.cells.scan import InputGatedCell, g, log_g


def mingru_gates(k: Tensor) -> tuple[Tensor, Tensor]:
    """The update gate z and the candidate h~ from k = W x + b (..., 2H)."""
    k_z, k_h = k.chunk(2, dim=-1)
    update_gate = torch.sigmoid(k_z)  # how much of h to replace
    candidate = g(k_h)  # the new content, positive
    return update_gate, candidate


def mingru_step(k: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """One step from k = W x + b (B, 2H): the new h and the update gate z."""
    update_gate, candidate = mingru_gates(k)
    return (1 - update_gate) * h + update_gate * candidate, update_gate


def mingru_loop(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """The step loop over x (T, B, I), for the ONNX export."""
    outputs = []
    for t in range(x.size(0)):
        h, _ = mingru_step(F.linear(x[t], weight, bias), h)
        outputs.append(h)
    return torch.stack(outputs), h


class MinGRU(InputGatedCell):
    """A GRU whose update gate and candidate read only the input: linear in h, so parallel in time."""

    name = "mingru"
    citation = "Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, Were RNNs all we needed?, 2024"
    summary = "minimal GRU: update gate and candidate from the input alone, so h is linear in time and trains as a scan"
    title = "the minGRU: its update gate and state h"
    order, colour = 50, "#17becf"
    parameter_formula = "2(HI + H)"
    gate_names = ("update",)
    blocks, loop = 2, staticmethod(mingru_loop)  # [k_z, k_h] = W x + b

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        h, update_gate = mingru_step(x_proj, state[0])
        if record is not None:
            record.update(update=update_gate)
        return (h,)

    def coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        update_gate, candidate = mingru_gates(k)
        return 1 - update_gate, update_gate * candidate

    def log_coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        k_z, k_h = k.chunk(2, dim=-1)
        return -F.softplus(k_z), -F.softplus(-k_z) + log_g(k_h)  # log(1 - z), log(z * h~)


CELL = MinGRU
