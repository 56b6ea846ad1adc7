"""What a recurrent cell declares, and what every cell shares.

A cell is one class, in its own module of lstm_lm/cells/, that says:

    name, citation, summary      what it is and which paper it comes from
    order, colour                where it sits in tables, its colour in plots
    state_names, memory          what a layer carries from step to step, and which of
                                 those carries the past (`inspect` and the page show it)
    gate_names                   its gates, as its paper names them
    options                      the model.* config fields it reads beyond the sizes
    shapes()                     its parameters per layer (their count follows)
    step()                       one time step: the textbook lines, each gate a named line
    sequence()                   a whole sequence: the step loop unless a cell knows better
    kernel, kernel_weights()     torch's fused kernel and the weights it takes, if any
    torch_module                 the torch.nn module with the same parameters, if any
    dropped                      the matrices weight drop (DropConnect) masks
    export_layer()               a module the ONNX exporter can write, or None

`Recurrent` (model.py) stacks cells into layers and owns their parameters, named as
torch.nn names them (`weight_ih_l0`, ...), so that a state dict of a cell that torch.nn
has loads into the torch.nn module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Params = dict[str, Tensor]  # one layer's parameters by name ("weight_ih", ...)
LayerState = tuple[Tensor, ...]  # one layer's state, in state_names' order, (B, size) each


DEFAULT_HEADS = 4  # model.num_heads when unset


class Cell:
    """A recurrent cell of `input_size` inputs and `hidden_size` units."""

    name: ClassVar[str]
    citation: ClassVar[str]
    summary: ClassVar[str]  # one line: the config's help and docs/reference.md
    title: ClassVar[str]  # the page's heading: "the LSTM: its gates and memory c"
    order: ClassVar[int]
    colour: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]] = ("h",)
    memory: ClassVar[str] = "h"
    gate_names: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()
    dropped: ClassVar[tuple[str, ...]] = ("weight_hh",)
    kernel: ClassVar[Callable | None] = None  # torch.lstm, torch.gru, torch.rnn_tanh
    torch_module: ClassVar[type[nn.Module] | None] = None  # nn.LSTM, ...: the module whose state dict ours matches
    kernel_takes_params: ClassVar[bool] = True  # the kernel reads the parameters as they are (see Recurrent)
    parameter_formula: ClassVar[str | None] = None  # docs/reference.md's count per layer, where not torch.nn's layout

    def __init__(self, input_size: int, hidden_size: int, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"the {self.name} cell has no option {', '.join(sorted(unknown))}")
        self.input_size, self.hidden_size = input_size, hidden_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size})"

    # -- sizes ------------------------------------------------------------------------

    @property
    def output_size(self) -> int:
        """The size of h, what the next layer and the output layer read."""
        return self.hidden_size

    def state_sizes(self) -> tuple[int, ...]:
        return (self.output_size,) * len(self.state_names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each parameter's shape, in the order the fused kernel takes them."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes().values())

    def reset_parameters(self, params: Params) -> None:
        """torch.nn's initialisation: every weight and bias uniform in +-1/sqrt(H)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in params.values():
            nn.init.uniform_(p, -bound, bound)

    # -- the computation ----------------------------------------------------------------

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        """The input's share of every gate for all time steps at once, x (T, B, I) -> (T, B, G*H):
        W_ih x + b_ih + b_hh (both biases fold in where they sit outside any gate)."""
        return F.linear(x, p["weight_ih"], p["bias_ih"] + p["bias_hh"])

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        """One time step from `project_input`'s row for it: the new state, h first. With
        `record`, a dict, the gates' activations are stored in it by name."""
        raise NotImplementedError

    def sequence(self, x: Tensor, state: LayerState, p: Params) -> tuple[Tensor, LayerState]:
        """x (T, B, I) -> h at every step (T, B, out) and the last state: the step loop.
        Only the recurrent half of each step waits for the previous one."""
        x_proj = self.project_input(x, p)
        outputs = []
        for x_t in x_proj.unbind(0):  # unbind, not x_proj[t]: its backward writes all T grads at once
            state = self.step(x_t, state, p)
            outputs.append(state[0])
        return torch.stack(outputs), state

    # -- the fused kernel -----------------------------------------------------------------

    def kernel_weights(self, p: Params) -> list[Tensor]:
        """The weights the fused kernel takes for this layer."""
        return list(p.values())

    def fused(
        self, x: Tensor, stacks: LayerState, weights: list[Tensor], num_layers: int, dropout: float, training: bool
    ) -> tuple[Tensor, LayerState]:
        """`kernel` over `num_layers` layers; `stacks` holds (L, B, size) per state name."""
        hx = stacks if len(stacks) > 1 else stacks[0]
        out, *new = self.kernel(x, hx, weights, True, num_layers, dropout, training, False, False)
        return out, tuple(new)

    # -- export ---------------------------------------------------------------------------

    def export_layer(self, p: Params) -> nn.Module | None:
        """A module that runs this layer as `sequence` does, which torch.onnx can write:
        forward(x (T, B, I), *state (B, size)) -> (h (T, B, out), *state). By default the
        torch.nn module, which the exporter writes as ONNX's own operator; None: no export."""
        if self.torch_module is None:
            return None
        return TorchLayer(self.torch_module(self.input_size, self.hidden_size), self.kernel_weights(p))

    # -- tests ----------------------------------------------------------------------------

    def random_state(self, batch: int, dtype: torch.dtype = torch.float32) -> LayerState:
        """A random state of the kind a run reaches (the tests carry it into a chunk)."""
        return tuple(torch.randn(batch, size, dtype=dtype) for size in self.state_sizes())


class HeadedCell(Cell):
    """A cell whose units split into model.num_heads equal heads (sLSTM, mLSTM); `heads`."""

    options: ClassVar[tuple[str, ...]] = ("num_heads",)

    def __init__(self, input_size: int, hidden_size: int, num_heads: int | None = None):
        super().__init__(input_size, hidden_size)
        self.heads = DEFAULT_HEADS if num_heads is None else num_heads
        if self.heads < 1 or hidden_size % self.heads:
            raise ValueError(
                f"model.num_heads: {self.heads} heads do not divide the hidden size {hidden_size} into equal "
                f"heads; choose a divisor of every layer's size"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}, heads={self.heads})"


class LoopLayer(nn.Module):
    """A layer as a TorchScript step loop, which torch.onnx writes as an ONNX Loop over time:
    forward(x (T, B, I), *state) -> (h (T, B, out), *state). `loop(x, *state, *weights,
    *constants)` is a module-level function TorchScript can compile (each cell's own)."""

    _scripted: ClassVar[dict] = {}

    def __init__(self, loop: Callable, weights: dict[str, Tensor], *constants: int):
        super().__init__()
        self.loop, self.names, self.constants = loop, list(weights), constants
        for name, w in weights.items():
            self.register_buffer(name, w.detach().clone())

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        if self.loop not in LoopLayer._scripted:
            LoopLayer._scripted[self.loop] = torch.jit.script(self.loop)
        weights = [getattr(self, name) for name in self.names]
        return LoopLayer._scripted[self.loop](x, *state, *weights, *self.constants)


class TorchLayer(nn.Module):
    """One layer of a torch.nn recurrent module (nn.LSTM, nn.GRU, nn.RNN) with the
    state passed as (B, size) tensors: what the ONNX exporter turns into ONNX's own
    LSTM / GRU / RNN operator."""

    def __init__(self, module: nn.Module, weights: list[Tensor]):
        super().__init__()
        self.module = module
        with torch.no_grad():
            for w, v in zip(module.parameters(), weights, strict=True):  # torch.nn's order, the kernel's
                w.copy_(v)

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        hx = tuple(s.unsqueeze(0) for s in state)
        out, new = self.module(x, hx if len(hx) > 1 else hx[0])
        return (out, *(s.squeeze(0) for s in (new if len(hx) > 1 else (new,))))
