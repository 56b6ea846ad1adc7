"""The parallel scan of the minimal RNNs (minGRU, minLSTM): a linear recurrence
h_t = a_t * h_{t-1} + b_t over a whole chunk at once, in log space (Heinsen 2023).

    h = linear_scan(log_a, log_b, h0)    # (T, B, H), every h_t at once

`InputGatedCell` is what the two cells share: gates that read only x_t, all of them in
one input matrix, and no recurrent matrix.

Unrolled, h_t = A_t h_0 + sum_{s<=t} (A_t / A_s) b_s with A_t = a_1 ... a_t. In log
space A_t is a cumulative sum, a* = cumsum(log a), and the sum over s a cumulative
log-sum-exp: h_t = exp(a*_t) h_0 + exp(a*_t + logcumsumexp_{s<=t}(log b_s - a*_s)).
No product of many gates ever underflows on the way, which is why the paper's form is
in log space. The carried state h_0 enters on its own, so it may have any sign (b_t > 0
is all the log form needs).

The sums run in float64: a*_t and log b_s - a*_s grow with t and cancel in the end, so
in float32 a chunk of 150 steps already loses h's fifth digit (a few elementwise passes
over (T, B, H); the products around them stay in the model's precision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.cells.base import Cell, LoopLayer, Params


def linear_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t for t = 1..T; log_a, log_b (T, B, H), h0 (B, H) -> h (T, B, H)."""
    out = full(log_a).dtype
    wide = torch.float32 if log_a.device.type == "mps" else torch.float64  # (MPS has no float64)
    log_a, log_b = log_a.to(wide), log_b.to(wide)
    a_star = torch.cumsum(log_a, dim=0)  # log A_t: how much of h_0 is left at t
    h = torch.exp(a_star) * h0.to(wide) + torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=0))
    return h.to(out)


def full(x: Tensor) -> Tensor:
    """x in float32 when it is in a 16-bit type (autocast's bf16), else as it is (float64 stays)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def log_g(x: Tensor) -> Tensor:
    """log g(x) for the minimal RNNs' positive candidate g(x) = x + 1/2 (x >= 0), sigmoid(x)
    (x < 0). Both branches stay finite everywhere, so that torch.where's gradient does too."""
    return torch.where(x >= 0, torch.log(torch.relu(x) + 0.5), -torch.nn.functional.softplus(-x))


def g(x: Tensor) -> Tensor:
    """The minimal RNNs' candidate activation: continuous, positive, linear for x >= 0."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


class InputGatedCell(Cell):
    """A cell whose gates and candidate read only the input: `blocks` blocks of H rows in one
    input matrix, linear in h_{t-1}, so `sequence` is a scan. `loop(x, h, weight, bias)` is
    the cell's step loop, a module-level function, for the ONNX export."""

    blocks: ClassVar[int]
    loop: ClassVar[Callable]
    dropped: ClassVar[tuple[str, ...]] = ()  # no recurrent matrix for weight drop to mask

    def shapes(self) -> dict[str, tuple[int, ...]]:
        rows = self.blocks * self.hidden_size
        return {"weight_ih": (rows, self.input_size), "bias_ih": (rows,)}

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        return F.linear(x, p["weight_ih"], p["bias_ih"])  # every block for every step at once

    def export_layer(self, p: Params) -> nn.Module:
        return LoopLayer(self.loop, {"weight": p["weight_ih"], "bias": p["bias_ih"]})
