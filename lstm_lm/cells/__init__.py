"""The recurrent cells: one module per cell, found by name.

    from lstm_lm import cells
    cells.names()                      # ('rnn', 'gru', 'lstm', 'cifg', 'mogrifier', 'mingru', ...)
    spec = cells.get("cifg")           # the Cell subclass declared in lstm_lm/cells/cifg.py
    cell = spec(input_size=64, hidden_size=128)

Every module here other than base.py declares one `Cell` subclass (base.py says what a
declaration holds) named after the module: adding a cell is adding a module. The
rest of lstm-lm reads this registry: the config's choices, the model and its two
engines, `inspect` and the web page (the gates and the memory), the plots' colours,
the ONNX export, the long-range experiment and the tests' list of cells.

    base.py       the interface, the step loop and the fused-kernel call every cell shares
    rnn.py        the simple (Elman) RNN, the smallest cell
    gru.py        the GRU
    lstm.py       the LSTM, and with model.proj_size the projected LSTM (LSTMP)
    cifg.py       the LSTM with a coupled input-forget gate
    mogrifier.py  the Mogrifier LSTM
    mingru.py     the minimal GRU, linear in h: one matrix product for a chunk's gates
    minlstm.py    the minimal LSTM, likewise
    slstm.py      xLSTM's sLSTM: exponential gates, normaliser and stabiliser, per-head recurrence
    mlstm.py      xLSTM's mLSTM: a matrix memory per head, trained chunkwise in parallel
    scan.py       their recurrence over a chunk: step by step, or the log-space parallel scan
    lstmp_kernel.py  the LSTMP's fused kernel for the CPU, its backward written out
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lstm_lm.cells.base import Cell

_NOT_CELLS = {"base", "scan", "lstmp_kernel"}


@cache
def _modules() -> tuple[str, ...]:
    return tuple(
        m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_CELLS and not m.name.startswith("_")
    )


@cache
def get(name: str) -> type[Cell]:
    """The cell declared in lstm_lm/cells/NAME.py; KeyError for a name that has no module."""
    if name not in _modules():
        raise KeyError(name)
    spec = importlib.import_module(f"{__name__}.{name}").CELL
    assert spec.name == name, f"lstm_lm/cells/{name}.py declares a cell named {spec.name!r}"
    return spec


@cache
def names() -> tuple[str, ...]:
    """Every registered cell, simplest first (each declaration's `order`). Imports torch."""
    return tuple(sorted(_modules(), key=lambda name: (get(name).order, name)))


def module_names() -> tuple[str, ...]:
    """The registered names without importing any cell (nor torch), alphabetical: for --help."""
    return tuple(sorted(_modules()))


def unknown(name: str) -> str:
    """The message for a cell this version does not have."""
    return f"unknown cell {name!r} (this version has {', '.join(names())})"
