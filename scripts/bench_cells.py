"""Training speed of every cell, against the same cells in an earlier version of lstm-lm.

    python scripts/bench_cells.py --baseline e7482a4      # the version before lstm_lm/cells/
    python scripts/bench_cells.py                          # this version's cells only

Each measurement is its own process (`--worker`): a ptb-small shaped model (2x200,
tied, 10k words, batch 20, bptt 35) of one cell and engine, a few untimed steps, then
`--steps` timed steps of lstm-lm's training step in float32. The baseline runs from a
git worktree of --baseline, so both versions run on the same machine in alternation,
round after round: a cell's ratio is the median of the per-round ratios, so a slow
spell of a shared machine hits both sides alike. Prints a Markdown table; --json
writes the records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(cell: str, impl: str, steps: int) -> None:
    """Runs inside the version under test (its lstm_lm first on sys.path): print tokens/s."""
    import time

    import torch

    from lstm_lm.config import ModelConfig
    from lstm_lm.model import LSTMLanguageModel

    # By file, not by import: an editable install would find this version's modules for a
    # name the other version lacks.
    if (Path.cwd() / "lstm_lm" / "training").is_dir():
        from lstm_lm.training.trainer import train_step
    else:  # a version before the training/ subpackage
        from lstm_lm.trainer import train_step

    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, impl=impl, embedding_size=200, hidden_size=200, num_layers=2, dropout=0.2)
    model = LSTMLanguageModel(cfg, 10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.randint(0, 10_000, ((steps + 3) * 35 + 1, 20), generator=torch.Generator().manual_seed(0))
    state = model.init_state(20)
    model.train()
    start = 0.0
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        x, y = data[i * 35 : (i + 1) * 35], data[i * 35 + 1 : (i + 1) * 35 + 1]
        _, state = train_step(model, optimizer, x, y, state, clip=0.25, precision="fp32")
    print(steps * 20 * 35 / (time.perf_counter() - start))


def measure(tree: Path, cell: str, impl: str, steps: int) -> float:
    env = os.environ | {"PYTHONPATH": str(tree)}  # ahead of the installed lstm_lm
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", cell, impl, str(steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=tree)
    return float(done.stdout.strip().splitlines()[-1])


def rows_of(tree: Path) -> list[tuple[str, str]]:
    """(cell, engine) pairs the version in `tree` has (a version before lstm_lm/cells/: its model.CELLS)."""
    if (tree / "lstm_lm" / "cells").is_dir():
        code = (
            "from lstm_lm import cells; print(' '.join(f'{c}:{e}' for c in cells.names() for e in "
            "(('cudnn', 'custom') if cells.get(c).kernel else ('custom',))))"
        )
    else:
        code = (
            "from lstm_lm import model as m; print(' '.join(f'{c}:{e}' for c in m.CELLS for e in ('cudnn', 'custom')))"
        )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tree).stdout
    return [tuple(item.split(":")) for item in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git revision to compare with (run from a temporary worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        cell, impl, steps = args.worker
        return worker(cell, impl, int(steps))
    from lstm_lm.experiment import machine_name

    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": ROOT}
        if args.baseline:
            base = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(base), args.baseline],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            trees["baseline"] = base
        try:
            rows = {name: rows_of(tree) for name, tree in trees.items()}
            times: dict[tuple[str, str, str], list[float]] = {}
            for r in range(args.rounds):
                for cell, impl in rows["this"]:
                    for name, tree in trees.items():
                        if (cell, impl) in rows[name]:
                            rate = measure(tree, cell, impl, args.steps)
                            times.setdefault((name, cell, impl), []).append(rate)
                            print(f"round {r + 1}: {name} {cell}/{impl}: {rate:,.0f} tokens/s", file=sys.stderr)
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    records = []
    print(f"{machine_name('cpu')}; ptb-small shape (2x200, batch 20, bptt 35), float32, {args.rounds} rounds\n")
    print("| cell | engine | train tokens/s | baseline tokens/s | ratio |")
    print("|---|---|---:|---:|---:|")
    for cell, impl in rows["this"]:
        ours = times[("this", cell, impl)]
        theirs = times.get(("baseline", cell, impl))
        ratio = statistics.median(a / b for a, b in zip(ours, theirs)) if theirs else None
        records.append(
            {
                "cell": cell,
                "impl": impl,
                "tokens_per_s": statistics.median(ours),
                "baseline_tokens_per_s": statistics.median(theirs) if theirs else None,
                "ratio": ratio,
            }
        )
        base_text = f"{statistics.median(theirs):,.0f}" if theirs else "(new)"
        print(f"| {cell} | {impl} | {statistics.median(ours):,.0f} | {base_text} | {f'{ratio:.2f}' if ratio else ''} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
