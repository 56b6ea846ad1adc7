"""The LSTM with a coupled input and forget gate (CIFG; Greff et al. 2017, the cell of
Gboard's next-word model, Hard et al. 2018).

What is written into the memory is exactly what is forgotten from it: input gate =
1 - forget gate. Three gate blocks instead of four (forget, candidate, output), a
quarter fewer recurrent parameters, and in Greff et al.'s comparison no worse than
the LSTM. Since 1 - sigmoid(z) = sigmoid(-z), a CIFG layer is an LSTM layer whose input
gate block is the forget block negated: that is its fused kernel (torch.lstm on the
expanded weights, gradients flowing back through the expansion) and its ONNX export.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstm_lm.cells.base import LayerState, Params
from lstm_lm.cells.lstm import LSTM, memory_update


class CIFG(LSTM):
    """input gate = 1 - forget gate; with proj_size, projected as LSTMP."""

    name = "cifg"
    citation = (
        "Greff et al., LSTM: a search space odyssey, IEEE TNNLS 2017; Hard et al., Federated learning "
        "for mobile keyboard prediction, 2018"
    )
    summary = "LSTM with a coupled input-forget gate (input = 1 - forget), the cell of Gboard's next-word model"
    title = "the CIFG LSTM: its gates (input = 1 - forget) and memory c"
    order, colour = 30, "#9467bd"
    blocks = 3  # forget, candidate, output
    kernel_takes_params = False  # the kernel takes the expanded weights of kernel_weights
    torch_module = None  # torch.nn has no CIFG (its weights are not nn.LSTM's)

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        h, c = state
        gates = torch.addmm(x_proj, h, p["weight_hh"].t())  # (B, 3H)
        f, g, o = gates.chunk(3, dim=1)

        forget_gate = torch.sigmoid(f)  # how much of the old memory to keep
        input_gate = 1 - forget_gate  # coupled: write exactly as much as was forgotten
        candidate = torch.tanh(g)  # the new content proposed for the memory
        h, c = memory_update(forget_gate, input_gate, candidate, o, c, record)
        return self.project(h, p), c

    def kernel_weights(self, p: Params) -> list[Tensor]:
        """The LSTM's four blocks (input, forget, candidate, output): input = -forget, so
        that sigmoid(input) = 1 - sigmoid(forget)."""

        def expand(w: Tensor) -> Tensor:
            f, g, o = w.chunk(3, dim=0)
            return torch.cat([-f, f, g, o])

        weights = [expand(p[name]) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return weights + ([p["weight_hr"]] if self.proj_size else [])


CELL = CIFG
