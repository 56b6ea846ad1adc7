"""Training speed of the 2024 cells' parallel forms, at the parameter count of `lstm-lm
experiment cells` on Penn Treebank (the ptb-small recipe: 2 layers, tied, 10k words,
batch 20, bptt 35; each cell at its matched hidden size).

    python scripts/bench_modern_cells.py                 # 5 rounds of 10 timed steps
    python scripts/bench_modern_cells.py --rounds 3 --json bench.json
    python scripts/bench_modern_cells.py --cells mingru --bptt 140 --batch 1   # other shapes, fewer cells

Rows, each a whole training step (forward, backward, clip, SGD) in the precision the
recipe picks on this machine, and its recurrent layers alone (forward and backward of
the layers on the embedding-sized input), in tokens/s:
- lstm, the fused kernel (oneDNN on a CPU): the LSTM's fastest path;
- the cells with a parallel form, each also through its own step loop (the base cell's
  time loop, one matrix product per step): the mLSTM's chunkwise form ("parallel"), and
  the minGRU's and minLSTM's two forms of their recurrence after one matrix product for
  all steps' gates, "step by step" (what a CPU trains with) and the log-space "scan"
  (what other devices train with).
Variants alternate within each round, so a slow spell of a shared machine hits all
alike; each ratio is the median of the per-round ratios. Prints a Markdown table and
the CPU it ran on.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lstm_lm import cells  # noqa: E402
from lstm_lm.cell_comparison import matched_model, parameter_count  # noqa: E402
from lstm_lm.cells.base import Cell  # noqa: E402
from lstm_lm.cells.scan import InputGatedCell  # noqa: E402
from lstm_lm.config import load_config  # noqa: E402
from lstm_lm.experiment import machine_name  # noqa: E402
from lstm_lm.model import LSTMLanguageModel  # noqa: E402
from lstm_lm.training.trainer import train_step  # noqa: E402
from lstm_lm.utils import autocast, pick_precision  # noqa: E402

VOCAB = 10_000
LSTM = ("lstm", "fused kernel")
# The cells with a parallel form (their own `sequence`: minGRU, minLSTM, mLSTM), each also through its step loop.
PARALLEL = [name for name in cells.names() if cells.get(name).sequence is not Cell.sequence]


def forms(name: str) -> tuple[str, ...]:
    if issubclass(cells.get(name), InputGatedCell):
        return ("step by step", "scan", "step loop")
    return ("parallel", "step loop")


VARIANTS = [LSTM] + [(name, form) for name in PARALLEL for form in forms(name)]


def build(cell: str, form: str, precision: str, batch: int, bptt: int):
    base = load_config("ptb-small", [])
    cfg = matched_model(base.model, cell, VOCAB, parameter_count(base.model, VOCAB))
    torch.manual_seed(0)
    model = LSTMLanguageModel(cfg, VOCAB).train()
    for c in model.rnn.cells:
        if form == "step loop":  # the cell's own step, one time step after another
            c.sequence = Cell.sequence.__get__(c)
        elif form in ("scan", "step by step"):
            c.sequence = functools.partial(c.scan, parallel=form == "scan")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.randint(0, VOCAB, (64 * bptt + 1, batch), generator=torch.Generator().manual_seed(0))
    state = {"hidden": model.init_state(batch), "i": 0}

    def whole_step() -> None:
        i = state["i"] % 60
        x, y = data[i * bptt : (i + 1) * bptt], data[i * bptt + 1 : (i + 1) * bptt + 1]
        _, state["hidden"] = train_step(model, optimizer, x, y, state["hidden"], 0.25, precision)
        state["i"] += 1

    x = torch.randn(bptt, batch, cfg.embedding_size, requires_grad=True)

    def layers_only() -> None:
        with autocast(torch.device("cpu"), precision):
            out, _ = model.rnn(x)
        out.float().sum().backward()

    return cfg, model, whole_step, layers_only


def tokens_per_s(fn, steps: int, tokens_per_step: int) -> float:
    fn()  # one untimed step
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * tokens_per_step / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--cells", default=",".join(PARALLEL), help="comma-separated, of " + ", ".join(PARALLEL))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    chosen = args.cells.split(",")
    if not set(chosen) <= set(PARALLEL) or min(args.batch, args.bptt, args.steps, args.rounds) < 1:
        sys.exit(f"error: --cells takes {', '.join(PARALLEL)}; --batch, --bptt, --steps and --rounds at least 1")
    variants = [v for v in VARIANTS if v == LSTM or v[0] in chosen]
    precision = pick_precision("auto", torch.device("cpu"))
    built = {v: build(*v, precision, args.batch, args.bptt) for v in variants}
    speeds = {v: {"step": [], "layers": []} for v in variants}
    for r in range(args.rounds):
        for v in variants:
            _, _, whole, layers = built[v]
            speeds[v]["step"].append(tokens_per_s(whole, args.steps, args.batch * args.bptt))
            speeds[v]["layers"].append(tokens_per_s(layers, args.steps, args.batch * args.bptt))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    def ratio(a, b, what):
        return statistics.median(x / y for x, y in zip(speeds[a][what], speeds[b][what], strict=True))

    shape = f"batch {args.batch}, bptt {args.bptt}"
    print(f"{machine_name('cpu')}; precision {precision}; ptb-small's parameter count; {shape}\n")
    print("| cell | form | units | parameters | step tokens/s | x LSTM | layers tokens/s | x LSTM | x own loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    records = []
    for v in variants:
        cfg, model, _, _ = built[v]
        step, layers = statistics.median(speeds[v]["step"]), statistics.median(speeds[v]["layers"])
        loop = (v[0], "step loop")
        own = f"{ratio(v, loop, 'step'):.2f}x / {ratio(v, loop, 'layers'):.2f}x" if v[0] != "lstm" and v != loop else ""
        row = (
            f"| {v[0]} | {v[1]} | {cfg.hidden_size} | {model.num_parameters():,} | {step:,.0f} | "
            f"{ratio(v, LSTM, 'step'):.2f}x | {layers:,.0f} | {ratio(v, LSTM, 'layers'):.2f}x | {own} |"
        )
        print(row)
        records.append({"cell": v[0], "form": v[1], "units": cfg.hidden_size, "speeds": speeds[v]})
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_name("cpu"), "shape": shape, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
