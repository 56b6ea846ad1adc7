"""The minimal LSTM (Feng et al., Were RNNs all we needed?, 2024).

The LSTM with its gates' dependence on h_{t-1} removed, no output gate, and the forget
and input gates normalised to sum to one, so that the state's scale does not drift:

    f_t = sigmoid(W_f x_t + b_f)               forget gate, from the input alone
    i_t = sigmoid(W_i x_t + b_i)               input gate, from the input alone
    f'_t, i'_t = f_t / (f_t + i_t), i_t / (f_t + i_t)
    h~_t = g(W_h x_t + b_h)                    candidate, positive (see mingru.py)
    h_t = f'_t * h_{t-1} + i'_t * h~_t

Linear in h_{t-1} (a_t = f'_t, b_t = i'_t h~_t), so a chunk's gates come from one matrix
product and the recurrence runs over time as a scan (scan.py). In log space the
normalised gates come out of one difference: with d = softplus(-k_f) - softplus(-k_i),
log f' = -softplus(d) and log i' = -softplus(-d), as in the paper's log-space code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lstm_lm.cells.base import LayerState, Params
from lstm_lm.cells.scan import InputGatedCell, g, log_g


def minlstm_gates(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The normalised forget and input gates and the candidate from k = W x + b (..., 3H)."""
    k_f, k_i, k_h = k.chunk(3, dim=-1)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    forget_gate, input_gate = f / (f + i), i / (f + i)  # they sum to one
    return forget_gate, input_gate, g(k_h)


def minlstm_step(k: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step from k = W x + b (B, 3H): the new h and the normalised forget and input gates."""
    forget_gate, input_gate, candidate = minlstm_gates(k)
    return forget_gate * h + input_gate * candidate, forget_gate, input_gate


def minlstm_loop(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """The step loop over x (T, B, I), for the ONNX export."""
    outputs = []
    for t in range(x.size(0)):
        h, _, _ = minlstm_step(F.linear(x[t], weight, bias), h)
        outputs.append(h)
    return torch.stack(outputs), h


class MinLSTM(InputGatedCell):
    """An LSTM whose forget and input gates read only the input and share one unit of weight."""

    name = "minlstm"
    citation = "Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, Were RNNs all we needed?, 2024"
    summary = "minimal LSTM: normalised forget and input gates from the input alone, so it trains as a scan"
    title = "the minLSTM: its forget and input gates and state h"
    order, colour = 60, "#bcbd22"
    parameter_formula = "3(HI + H)"
    gate_names = ("forget", "input")
    blocks, loop = 3, staticmethod(minlstm_loop)  # [k_f, k_i, k_h] = W x + b

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        h, forget_gate, input_gate = minlstm_step(x_proj, state[0])
        if record is not None:
            record.update(forget=forget_gate, input=input_gate)
        return (h,)

    def coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        forget_gate, input_gate, candidate = minlstm_gates(k)
        return forget_gate, input_gate * candidate

    def log_coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = k.chunk(3, dim=-1)
        d = F.softplus(-k_f) - F.softplus(-k_i)  # log(i / f)
        return -F.softplus(d), -F.softplus(-d) + log_g(k_h)  # log f', log(i' * h~)


CELL = MinLSTM
