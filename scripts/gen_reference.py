"""Rewrite the generated tables of docs/reference.md: the config fields (lstm_lm/config.py's
declarations) and the cells (the registry, lstm_lm/cells/).

python scripts/gen_reference.py          # tests/test_readme.py checks that it is current
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lstm_lm import cells  # noqa: E402
from lstm_lm.config import reference_table  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def cells_table() -> str:
    """One row per registered cell: what it is, its state and gates, its engines, its export."""
    rows = [
        "| cell | what it is | state (memory) | gates | engines | ONNX | parameters per layer (I in, H units) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in cells.names():
        spec = cells.get(name)
        cell = spec(10, 100)
        engines = "custom, cudnn" if spec.kernel is not None else "custom"
        state = ", ".join(f"**{s}**" if s == spec.memory else s for s in spec.state_names)
        onnx = "its own operator" if spec.torch_module is not None else "LSTM operator" if spec.kernel else "Loop"
        count = spec.parameter_formula
        if count is None:  # the torch.nn layout: blocks of W_ih, W_hh and two biases
            blocks = cell.shapes()["weight_hh"][0] // cell.hidden_size
            extra = [k for k in cell.shapes() if k not in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            count = f"{blocks}(HI + H² + 2H)" + "".join(f" + {k}" for k in extra)
        rows.append(
            f"| `{name}` | {spec.summary}; {spec.citation} | {state} | {', '.join(spec.gate_names) or '-'} "
            f"| {engines} | {onnx} | {count} |"
        )
    return "\n".join(rows) + "\n"


TABLES = {"fields": reference_table, "cells": cells_table}


def render(text: str) -> str:
    """`text` with each generated table between its markers replaced by the current one."""
    for name, table in TABLES.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _, s=start, e=end, t=table: f"{s}\n{t()}{e}", text)
    return text


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {PAGE}", file=sys.stderr)
