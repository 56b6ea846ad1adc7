"""The long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of
Gers et al. 2000), and with `model.proj_size` the projected LSTM (LSTMP, Sak et al. 2014).

The memory c is written and read through gates: the forget gate decides how much of
the old memory to keep, the input gate how much of a new candidate to write, the
output gate how much of the memory to expose as h. Parameters in torch.nn.LSTM's
order: input, forget, candidate, output (4 blocks of H rows), and with a projection
`weight_hr` (P, H) last, so that a state dict loads into torch.nn.LSTM(proj_size=P).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.cells.base import Cell, LayerState, Params, TorchLayer
from lstm_lm.cells.lstmp_kernel import lstmp


def memory_update(
    forget_gate: Tensor, input_gate: Tensor, candidate: Tensor, output_logit: Tensor, c: Tensor, record: dict | None
) -> tuple[Tensor, Tensor]:
    """The LSTM's memory lines, shared by the LSTM family: keep some, write some, expose some."""
    c = forget_gate * c + input_gate * candidate  # cell update: keep some of the old memory, write some new
    output_gate = torch.sigmoid(output_logit)  # how much of the memory to expose
    h = output_gate * torch.tanh(c)  # the hidden state the next layer and step see
    if record is not None:
        record.update(forget=forget_gate, input=input_gate, output=output_gate)
    return h, c


class LSTM(Cell):
    """The LSTM; with proj_size P < H, h is projected to P units after the output gate (LSTMP)."""

    name = "lstm"
    citation = (
        "Hochreiter & Schmidhuber, Long short-term memory, Neural Computation 1997; Gers et al., "
        "Learning to forget, Neural Computation 2000; LSTMP: Sak et al., Long short-term memory "
        "recurrent neural network architectures for large scale acoustic modeling, Interspeech 2014"
    )
    summary = "long short-term memory: forget, input and output gates around a memory cell c (model.proj_size: LSTMP)"
    title = "the LSTM: its gates and memory c"
    order, colour = 20, "#1f77b4"
    state_names, memory = ("h", "c"), "c"
    gate_names = ("forget", "input", "output")
    options = ("proj_size",)
    kernel, torch_module = staticmethod(torch.lstm), nn.LSTM
    blocks = 4  # gate blocks in W_ih and W_hh

    def __init__(self, input_size: int, hidden_size: int, proj_size: int | None = None):
        super().__init__(input_size, hidden_size)
        if proj_size is not None and not 0 < proj_size < hidden_size:
            raise ValueError(f"proj_size must be in [1, hidden_size - 1] = [1, {hidden_size - 1}], got {proj_size}")
        self.proj_size = proj_size or 0

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    def state_sizes(self) -> tuple[int, ...]:
        return self.output_size, self.hidden_size  # h (projected), c

    def shapes(self) -> dict[str, tuple[int, ...]]:
        G, H, I, P = self.blocks * self.hidden_size, self.hidden_size, self.input_size, self.output_size
        shapes = {"weight_ih": (G, I), "weight_hh": (G, P), "bias_ih": (G,), "bias_hh": (G,)}
        return shapes | ({"weight_hr": (P, H)} if self.proj_size else {})

    def project(self, h: Tensor, p: Params) -> Tensor:
        """LSTMP: h (B, H) -> W_hr h (B, P), the state the next step and layer read."""
        return F.linear(h, p["weight_hr"]) if self.proj_size else h

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        h, c = state
        gates = torch.addmm(x_proj, h, p["weight_hh"].t())  # x_proj + W_hh h, (B, 4H): the four gates side by side
        i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTM's order

        forget_gate = torch.sigmoid(f)  # how much of the old memory to keep
        input_gate = torch.sigmoid(i)  # how much of the new candidate to write
        candidate = torch.tanh(g)  # the new content proposed for the memory
        h, c = memory_update(forget_gate, input_gate, candidate, o, c, record)
        return self.project(h, p), c

    def fused(
        self, x: Tensor, stacks: LayerState, weights: list[Tensor], num_layers: int, dropout: float, training: bool
    ) -> tuple[Tensor, LayerState]:
        if not self.proj_size:
            return super().fused(x, stacks, weights, num_layers, dropout, training)
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            # oneDNN has no projection. In float32 training lstmp_kernel's loop, whose backward
            # is written out, is a little faster than ATen's generic one (docs/speed.md);
            # ATen's runs the forward alone (evaluation), where it is the faster, and bf16.
            return lstmp(x, stacks, weights, num_layers, dropout, training)
        with warnings.catch_warnings():  # ATen's own kernel runs it, as it says
            warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
            return super().fused(x, stacks, weights, num_layers, dropout, training)

    def export_layer(self, p: Params) -> nn.Module:
        """ONNX's LSTM operator on the kernel's weights (for the CIFG too, whose kernel weights
        are an LSTM's); with a projection, which that operator lacks, the step loop as a Loop."""
        if self.proj_size:
            return LSTMLoop(self.kernel_weights(p), self.proj_size)
        return TorchLayer(nn.LSTM(self.input_size, self.hidden_size), self.kernel_weights(p))


def lstm_loop(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b: Tensor,
    w_hr: Tensor,
    q: Tensor,
    r: Tensor,
    rounds: int,
):
    """The LSTM family's step loop in TorchScript, which torch.onnx writes as an ONNX Loop
    over time: the projection when w_hr has rows, the Mogrifier's rounds (q, r stacked)."""
    outputs = []
    for t in range(x.size(0)):
        x_t = x[t]
        for k in range(rounds):  # the Mogrifier: x and h gate each other
            if k % 2 == 0:
                x_t = 2 * torch.sigmoid(F.linear(h, q[k // 2])) * x_t
            else:
                h = 2 * torch.sigmoid(F.linear(x_t, r[k // 2])) * h
        i, f, g, o = (F.linear(x_t, w_ih, b) + F.linear(h, w_hh)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr.size(0) > 0:
            h = F.linear(h, w_hr)
        outputs.append(h)
    return torch.stack(outputs), h, c


class LSTMLoop(nn.Module):
    """An LSTM-family layer as `lstm_loop` (scripted on first use): forward(x, h, c) -> (out, h, c)."""

    _scripted = None

    def __init__(
        self, weights: list[Tensor], proj_size: int, q: Tensor | None = None, r: Tensor | None = None, rounds: int = 0
    ):
        super().__init__()
        w_ih, w_hh, b_ih, b_hh = (w.detach().clone() for w in weights[:4])
        w_hr = weights[4].detach().clone() if proj_size else w_ih.new_zeros(0, w_hh.size(1))
        empty = w_ih.new_zeros(0, 1, 1)
        for name, t in (
            ("w_ih", w_ih),
            ("w_hh", w_hh),
            ("b", b_ih + b_hh),
            ("w_hr", w_hr),
            ("q", empty if q is None else q),
            ("r", empty if r is None else r),
        ):
            self.register_buffer(name, t)
        self.rounds = rounds

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if LSTMLoop._scripted is None:
            LSTMLoop._scripted = torch.jit.script(lstm_loop)
        return LSTMLoop._scripted(x, h, c, self.w_ih, self.w_hh, self.b, self.w_hr, self.q, self.r, self.rounds)


CELL = LSTM
