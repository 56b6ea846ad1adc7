"""The projected LSTM's (LSTMP's) fused kernel for the CPU, with its backward written out.

    out, (h_n, c_n) = lstmp(x, (h0, c0), weights, num_layers, dropout, training)

It takes what `torch.lstm` takes for an LSTMP (per layer W_ih, W_hh, b_ih, b_hh, W_hr;
h0 (L, B, P), c0 (L, B, H)) and returns what it returns. oneDNN has no projection, so
on a CPU `torch.lstm` runs an LSTMP as ATen's generic loop of small operations, and
autograd then computes each weight's gradient one time step at a time: 35 products of
20 rows each for W_hh and as many for W_hr per chunk, and as many additions. Here the
forward keeps what the backward needs, and the backward runs the recurrence back in
time and leaves the weights for the end, where one product over all T * B rows gives
each weight's gradient:

    dW_hh = sum_t dz_t^T h_{t-1} = dZ^T H_prev      dW_hr = sum_t dp_t^T m_t = dP^T M

With z = W_ih x_t + b + W_hh h_{t-1} the gates' pre-activations (i, f, g, o, nn.LSTM's
order), m_t = o * tanh(c_t) and h_t = W_hr m_t, one step back is

    dp   = d(out_t) + dh_t (from step t + 1)      dm = dp W_hr
    do   = dm * tanh(c_t)                          dc = dc_t + dm * o * (1 - tanh(c_t)^2)
    di   = dc * g      df = dc * c_{t-1}      dg = dc * i      dc_{t-1} = dc * f
    dz   = [di, df, do] * s (1 - s) for the sigmoids, dg * (1 - g^2) for the candidate
    dh_{t-1} = dz W_hh

The input's share W_ih x + b is one product over the whole chunk before the loop, an
ordinary autograd operation. `tests/test_lstmp_kernel.py` checks values and gradients
against torch.lstm in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _Recurrence(torch.autograd.Function):
    """One LSTMP layer's time loop: xw (T, B, 4H) = W_ih x + b for every step, h0 (B, P),
    c0 (B, H), W_hh (4H, P), W_hr (P, H) -> out (T, B, P), h_n, c_n."""

    @staticmethod
    def forward(ctx, xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Tensor):
        T, B, G = xw.shape
        H = G // 4
        gates = xw.clone()  # each step adds W_hh h_{t-1}, then its nonlinearities, in place
        c = xw.new_empty(T + 1, B, H)  # the memory before each step, and after the last
        h = xw.new_empty(T + 1, B, w_hr.size(0))  # h0, then each step's projected output
        tanh_c = xw.new_empty(T, B, H)
        m = xw.new_empty(T, B, H)  # o * tanh(c_t), the state before its projection
        c[0], h[0] = c0, h0
        w_hh_t = w_hh.t().contiguous()  # a product of 20 rows by it is faster laid out so
        for t in range(T):
            z = gates[t].addmm_(h[t], w_hh_t)
            i, f, g, o = z.chunk(4, 1)
            z[:, : 2 * H].sigmoid_()  # input and forget gates
            g.tanh_()  # the candidate
            o.sigmoid_()  # the output gate
            torch.addcmul(f * c[t], i, g, out=c[t + 1])  # keep some memory, write some
            torch.tanh(c[t + 1], out=tanh_c[t])
            torch.mul(o, tanh_c[t], out=m[t])
            torch.mm(m[t], w_hr.t(), out=h[t + 1])  # the projection
        ctx.save_for_backward(gates, c, h, tanh_c, m, w_hh, w_hr)
        return h[1:], h[T].clone(), c[T].clone()

    @staticmethod
    def backward(ctx, d_out: Tensor, d_h_n: Tensor, d_c_n: Tensor):
        gates, c, h, tanh_c, m, w_hh, w_hr = ctx.saved_tensors
        T, B, G = gates.shape
        H = G // 4
        i, f, g, o = gates.chunk(4, 2)
        # Each step's local derivatives, for all steps at once before the loop: a gate's
        # gradient is d_c (or d_m) times one of these.
        by_d_c = torch.stack((g * i * (1 - i), c[:-1] * f * (1 - f), i * (1 - g * g)), dim=2)  # i, f, g
        by_d_m_o = tanh_c * o * (1 - o)
        by_d_m_c = o * (1 - tanh_c * tanh_c)
        d_z = torch.empty_like(gates)  # d loss / d pre-activations: xw's gradient
        d_p = torch.empty_like(h[1:])  # d loss / d each step's projected output
        d_h, d_c = d_h_n, d_c_n.clone()
        for t in range(T - 1, -1, -1):
            torch.add(d_out[t], d_h, out=d_p[t])
            d_m = d_p[t] @ w_hr
            d_c.addcmul_(d_m, by_d_m_c[t])
            torch.mul(d_m, by_d_m_o[t], out=d_z[t, :, 3 * H :])  # the output gate
            torch.mul(d_c[:, None], by_d_c[t], out=d_z[t, :, : 3 * H].view(B, 3, H))  # input, forget, candidate
            d_c.mul_(f[t])
            d_h = d_z[t] @ w_hh
        d_w_hh = d_z.flatten(0, 1).t() @ h[:T].flatten(0, 1)
        d_w_hr = d_p.flatten(0, 1).t() @ m.flatten(0, 1)
        return d_z, d_h, d_c, d_w_hh, d_w_hr


def lstmp(
    x: Tensor,
    state: tuple[Tensor, Tensor],
    weights: list[Tensor],
    num_layers: int,
    dropout: float,
    training: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`torch.lstm(x, state, weights, True, num_layers, dropout, training, False, False)`
    for an LSTMP, time-major: x (T, B, I), state (h0 (L, B, P), c0 (L, B, H)), five
    weights per layer; returns out (T, B, P) and (h_n, c_n) stacked as the state."""
    h_n, c_n = [], []
    for k in range(num_layers):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights[5 * k : 5 * k + 5]
        if k > 0:
            x = F.dropout(x, dropout, training)  # between layers, as torch.lstm
        xw = F.linear(x, w_ih, b_ih + b_hh)  # the input's share of every gate, all steps at once
        x, h, c = _Recurrence.apply(xw, state[0][k], state[1][k], w_hh, w_hr)
        h_n.append(h)
        c_n.append(c)
    return x, (torch.stack(h_n), torch.stack(c_n))
