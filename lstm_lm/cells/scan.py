"""The minimal RNNs' (minGRU, minLSTM) recurrence, h_t = a_t * h_{t-1} + b_t, over a whole
chunk at once, in two forms:

    h = linear_recurrence(a, b, h0)      # (T, B, H): one step after another, backward written out
    h = linear_scan(log_a, log_b, h0)    # the same h, every h_t at once (Heinsen 2023)

`InputGatedCell` is what the two cells share: gates that read only x_t, all of them in
one input matrix, and no recurrent matrix. Its `sequence` computes every step's a_t and
b_t in bulk from one matrix product, then runs the recurrence: on a CPU step by step,
elsewhere as the parallel scan.

The scan. Unrolled, h_t = A_t h_0 + sum_{s<=t} (A_t / A_s) b_s with A_t = a_1 ... a_t.
In log space A_t is a cumulative sum, a* = cumsum(log a), and the sum over s a
cumulative log-sum-exp: h_t = exp(a*_t) h_0 + exp(a*_t + logcumsumexp_{s<=t}(log b_s -
a*_s)). No product of many gates ever underflows on the way, which is why the paper's
form is in log space. The carried state h_0 enters on its own, so it may have any sign
(b_t > 0 is all the log form needs). The sums run in float64: a*_t and log b_s - a*_s
grow with t and cancel in the end, so in float32 a chunk of 150 steps already loses h's
fifth digit.

The step-by-step form needs none of that: it multiplies the state by one a_t at a time,
so nothing underflows or cancels, in the model's precision. What it costs is one small
elementwise pass per step, which a GPU pays in kernel launches and a CPU barely notices:
on a few CPU cores the scan's float64 log-sum-exp over (T, B, H) is the slower of the
two at language-model chunk lengths (docs/cells.md, "Speed of the parallel forms").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.cells.base import Cell, LayerState, LoopLayer, Params


def linear_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t for t = 1..T; log_a, log_b (T, B, H), h0 (B, H) -> h (T, B, H)."""
    out = full(log_a).dtype
    wide = torch.float32 if log_a.device.type == "mps" else torch.float64  # (MPS has no float64)
    log_a, log_b = log_a.to(wide), log_b.to(wide)
    a_star = torch.cumsum(log_a, dim=0)  # log A_t: how much of h_0 is left at t
    h = torch.exp(a_star) * h0.to(wide) + torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=0))
    return h.to(out)


class LinearRecurrence(torch.autograd.Function):
    """h_t = a_t h_{t-1} + b_t, one step after another, with the backward written out.

    Backward, with g_t the gradient reaching h_t from outside: the gradient on h_t is
    d_t = g_t + a_{t+1} d_{t+1}, one step at a time back from d_T = g_T; then in bulk
    db_t = d_t, da_t = d_t h_{t-1}, dh_0 = a_1 d_1. Autograd of the same loop would keep
    two tensors per step and run each step's backward as its own few ops."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        h = [h0]
        for t in range(a.size(0)):
            h.append(torch.addcmul(b[t], a[t], h[-1]))
        ctx.save_for_backward(a, torch.stack(h[:-1]))  # h_0 ... h_{T-1}, what each a_t multiplied
        return torch.stack(h[1:])

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, h_before = ctx.saved_tensors
        d = [grad_h[-1]]
        for t in range(a.size(0) - 1, 0, -1):
            d.append(torch.addcmul(grad_h[t - 1], a[t], d[-1]))
        d = torch.stack(d[::-1])  # d_1 ... d_T
        return d * h_before, d, a[0] * d[0]


def linear_recurrence(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t for t = 1..T; a, b (T, B, H), h0 (B, H) -> h (T, B, H), step by step."""
    return LinearRecurrence.apply(a, b, h0.to(a.dtype))


def full(x: Tensor) -> Tensor:
    """x in float32 when it is in a 16-bit type (autocast's bf16), else as it is (float64 stays)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def log_g(x: Tensor) -> Tensor:
    """log g(x) for the minimal RNNs' positive candidate g(x) = x + 1/2 (x >= 0), sigmoid(x)
    (x < 0). Both branches stay finite everywhere, so that torch.where's gradient does too."""
    return torch.where(x >= 0, torch.log(torch.relu(x) + 0.5), -F.softplus(-x))


def g(x: Tensor) -> Tensor:
    """The minimal RNNs' candidate activation: continuous, positive, linear for x >= 0."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


class InputGatedCell(Cell):
    """A cell whose gates and candidate read only the input: `blocks` blocks of H rows in one
    input matrix, linear in h_{t-1}, so `sequence` is a scan. A cell gives its recurrence's
    coefficients twice, as they are and in log space (for the parallel scan), from k = W x + b
    of any leading shape. `loop(x, h, weight, bias)` is the cell's step loop, a module-level
    function, for the ONNX export."""

    blocks: ClassVar[int]
    loop: ClassVar[Callable]
    dropped: ClassVar[tuple[str, ...]] = ()  # no recurrent matrix for weight drop to mask

    def coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """a, b of h_t = a_t h_{t-1} + b_t."""
        raise NotImplementedError

    def log_coefficients(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """log a, log b, each finite wherever a and b underflow."""
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        rows = self.blocks * self.hidden_size
        return {"weight_ih": (rows, self.input_size), "bias_ih": (rows,)}

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        return F.linear(x, p["weight_ih"], p["bias_ih"])  # every block for every step at once

    def sequence(self, x: Tensor, state: LayerState, p: Params) -> tuple[Tensor, LayerState]:
        return self.scan(x, state, p, parallel=x.device.type != "cpu")

    def scan(self, x: Tensor, state: LayerState, p: Params, parallel: bool) -> tuple[Tensor, LayerState]:
        """Every step's gates from one matrix product (in float32 under autocast), then the
        recurrence over time: the parallel scan, or step by step."""
        k = full(self.project_input(x, p))
        if parallel:
            h = linear_scan(*self.log_coefficients(k), state[0])
        else:
            h = linear_recurrence(*self.coefficients(k), state[0])
        h = h.to(x.dtype)
        return h, (h[-1],)

    def export_layer(self, p: Params) -> nn.Module:
        return LoopLayer(self.loop, {"weight": p["weight_ih"], "bias": p["bias_ih"]})
