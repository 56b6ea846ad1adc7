"""The LSTM's relatives on Penn Treebank at equal parameters and an equal wall-clock budget.

    python scripts/ptb_cells.py --data ../shared/data/ptb --minutes 8 --cells lstm,cifg,mogrifier

Each cell gets the hidden size that gives it the LSTM's parameter count (2 layers, the
embedding tied to the output and as wide as the last layer), then `lstm-lm train` runs
it for the same minutes of wall time (final validation and test included) with the
ptb-small recipe's settings, SGD at lr 20 annealed to zero by a cosine planned against
the budget. Runs one after another in their own processes; prints a Markdown table
(test perplexity, tokens/s, parameters, epochs) and writes results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lstm_lm import cells
from lstm_lm.checkpoint import load_checkpoint
from lstm_lm.experiment import machine_name

LAYERS = 2


def parameters(cell: str, hidden: int, vocab: int) -> int:
    """A 2-layer model of `cell` with `hidden` units, its embedding tied to the decoder."""
    spec = cells.get(cell)
    return vocab * hidden + vocab + sum(spec(hidden, hidden).num_parameters() for _ in range(LAYERS))


def matched_hidden(cell: str, target: int, vocab: int) -> int:
    return min(range(8, 4096), key=lambda h: abs(parameters(cell, h, vocab) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/ptb")
    parser.add_argument("--cells", default="lstm,cifg,mogrifier")
    parser.add_argument("--hidden", type=int, default=200, help="the LSTM's units; the others match its parameters")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/ptb-cells"))
    args = parser.parse_args()
    vocab = len({w for line in open(Path(args.data) / "train.txt", encoding="utf-8") for w in line.split()}) + 1
    target = parameters("lstm", args.hidden, vocab)
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    results = {"machine": machine_name("cpu"), "minutes": args.minutes, "threads": args.threads, "cells": {}}
    for cell in args.cells.split(","):
        hidden = matched_hidden(cell, target, vocab)
        out = args.out / cell
        sets = [
            f"model.cell={cell}",
            f"model.hidden_size={hidden}",
            f"model.embedding_size={hidden}",
            f"train.time_budget={args.minutes}",
            "train.epochs=1000",
            "train.schedule=cosine",
            "train.precision=fp32",
            "train.checkpoint_minutes=null",
        ]
        command = [
            sys.executable,
            "-m",
            "lstm_lm",
            "train",
            "--config",
            "ptb-small",
            "--data",
            args.data,
            "--out",
            str(out),
            "--overwrite",
            *[a for s in sets for a in ("--set", s)],
        ]
        print(f"== {cell}: {hidden} units", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first = next(r for r in records if r.get("complete_epoch"))  # the same tokens seen by every cell
        results["cells"][cell] = {
            "hidden_size": hidden,
            "parameters": load_checkpoint(out)[0].num_parameters(),
            "test_perplexity": summary["test_perplexity"],
            "valid_perplexity": summary["best_valid_perplexity"],
            "epochs": round(summary["steps"] / first["step"], 2),
            "valid_after_one_epoch": first["val_ppl"],
            "steps": summary["steps"],
            "tokens_per_s": sum(s["tokens_per_s"] for s in steps) / len(steps),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(results["cells"][cell]), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['machine']}; {args.minutes:g} minutes per cell\n")
    print("| cell | units | parameters | epochs | train tokens/s | valid ppl after 1 epoch | valid ppl | test ppl |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell, r in results["cells"].items():
        print(
            f"| {cell} | {r['hidden_size']} | {r['parameters']:,} | {r['epochs']} | {r['tokens_per_s']:,.0f} "
            f"| {r['valid_after_one_epoch']:.2f} | {r['valid_perplexity']:.2f} | {r['test_perplexity']:.2f} |"
        )


if __name__ == "__main__":
    main()
