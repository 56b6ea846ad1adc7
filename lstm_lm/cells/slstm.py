"""The sLSTM of xLSTM (Beck, Pöppel, Spanring, Auer, Prudnikova, Kopp, Klambauer,
Brandstetter & Hochreiter, xLSTM: extended long short-term memory, NeurIPS 2024).

The LSTM with an exponential input gate, a normaliser state n that keeps the memory's
scale, and a stabiliser m that keeps exp from overflowing; the recurrent matrices are
block-diagonal, one block per head (model.num_heads):

    i~, f~, z~, o~ = W x_t + R h_{t-1} + b     R: one (d, d) block per head and gate
    m_t = max(log f_t + m_{t-1}, i~_t)          the stabiliser, log f_t = log sigmoid(f~_t)
    i_t = exp(i~_t - m_t)                       input gate, exponential (stabilised)
    f_t = exp(log f_t + m_{t-1} - m_t)          forget gate (stabilised)
    c_t = f_t * c_{t-1} + i_t * tanh(z~_t)      the memory
    n_t = f_t * n_{t-1} + i_t                   the normaliser: the memory's total weight
    h_t = sigmoid(o~_t) * c_t / n_t             output gate on the normalised memory

m cancels out of c_t / n_t: the stabilised cell computes the paper's unstabilised one.
The forget gate is the paper's sigmoid choice; its bias starts between 3 and 6, as in
the paper's code, so that the memory begins long. The gates read h_{t-1}: there is no
parallel form, and both engines run the step loop (compile it with train.compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.cells.base import HeadedCell, LayerState, LoopLayer, Params

FORGET_BIAS = (3.0, 6.0)  # the range the forget gate's bias starts in, across units


def slstm_step(
    x_proj: Tensor, h: Tensor, c: Tensor, n: Tensor, m: Tensor, weight_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step: the new h, c, n, m and the (stabilised) input, forget and output gates."""
    B, H = h.shape
    heads, _, d = weight_hh.shape  # (heads, 4d, d): each head's four gate blocks
    per_head = torch.bmm(h.view(B, heads, d).transpose(0, 1), weight_hh.transpose(1, 2))  # (heads, B, 4d)
    recurrent = per_head.view(heads, B, 4, d).permute(1, 2, 0, 3).reshape(B, 4 * H)  # gate-major, as x_proj
    i, f, z, o = (x_proj + recurrent).chunk(4, dim=1)

    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)  # the stabiliser: the largest log weight in the memory
    input_gate = torch.exp(i - m_new)  # exponential input gate, at most 1 once stabilised
    forget_gate = torch.exp(log_f + m - m_new)  # how much of the old memory to keep
    output_gate = torch.sigmoid(o)  # how much of the memory to expose
    c = forget_gate * c + input_gate * torch.tanh(z)  # the memory
    n = forget_gate * n + input_gate  # the normaliser
    h = output_gate * c / n.clamp_min(1e-30)  # (n > 0 from the first step on; the clamp guards underflow)
    return h, c, n, m_new, input_gate, forget_gate, output_gate


def slstm_loop(
    x: Tensor, h: Tensor, c: Tensor, n: Tensor, m: Tensor, weight_ih: Tensor, bias: Tensor, weight_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The step loop over x (T, B, I), for the ONNX export."""
    outputs = []
    for t in range(x.size(0)):
        h, c, n, m, _, _, _ = slstm_step(F.linear(x[t], weight_ih, bias), h, c, n, m, weight_hh)
        outputs.append(h)
    return torch.stack(outputs), h, c, n, m


class SLSTM(HeadedCell):
    """xLSTM's scalar-memory LSTM: exponential gating with a normaliser and a stabiliser, per-head recurrence."""

    name = "slstm"
    citation = "Beck et al., xLSTM: extended long short-term memory, NeurIPS 2024 (the sLSTM)"
    summary = (
        "xLSTM's sLSTM: exponential input gate, normaliser n and stabiliser m, "
        "block-diagonal recurrence with model.num_heads heads"
    )
    title = "the sLSTM: its exponential gates and memory c"
    order, colour = 70, "#8c564b"
    state_names, memory = ("h", "c", "n", "m"), "c"
    parameter_formula = "4(HI + H²/heads + H)"
    gate_names = ("input", "forget", "output")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        H, I, d = self.hidden_size, self.input_size, self.hidden_size // self.heads
        return {"weight_ih": (4 * H, I), "weight_hh": (self.heads, 4 * d, d), "bias": (4 * H,)}

    def reset_parameters(self, params: Params) -> None:
        super().reset_parameters(params)
        H = self.hidden_size
        with torch.no_grad():
            params["bias"][H : 2 * H] = torch.linspace(*FORGET_BIAS, H)

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        return F.linear(x, p["weight_ih"], p["bias"])

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        h, c, n, m, input_gate, forget_gate, output_gate = slstm_step(x_proj, *state, p["weight_hh"])
        if record is not None:
            record.update(input=input_gate, forget=forget_gate, output=output_gate)
        return h, c, n, m

    def export_layer(self, p: Params) -> nn.Module:
        weights = {"weight_ih": p["weight_ih"], "bias": p["bias"], "weight_hh": p["weight_hh"]}
        return LoopLayer(slstm_loop, weights)

    def random_state(self, batch: int, dtype: torch.dtype = torch.float32) -> LayerState:
        """n > 0 and |c| < n, as every state after the first step has."""
        h, c, n, m = super().random_state(batch, dtype)
        n = 0.5 + n.abs()
        return h, n * torch.tanh(c), n, m


CELL = SLSTM
