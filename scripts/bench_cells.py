"""Training speed of every cell, against the same cells in an earlier version of lstm-lm.

    python scripts/bench_cells.py --baseline e7482a4      # the version before lstm_lm/cells/
    python scripts/bench_cells.py                          # this version's cells only
    python scripts/bench_cells.py --config ptb-cpu-30min --cells lstm,cifg --baseline 1a66d2b

Each measurement is its own process (`--worker`): a model of one cell and engine,
shaped as a built-in recipe's model section (`--config`, ptb-small by default: 2x200,
tied, 10k words) on batches of its batch size and bptt, a few untimed steps, then
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


def worker(cell: str, impl: str, steps: int, shape: dict) -> None:
    """Runs inside the version under test (its lstm_lm first on sys.path): print tokens/s.
    `shape`: the model section's fields (cell and impl aside), batch_size and bptt."""
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

    from lstm_lm import utils

    if hasattr(utils, "keep_freed_memory"):  # as every lstm-lm process does (a version since it)
        utils.keep_freed_memory()
    torch.manual_seed(0)
    batch, bptt = shape.pop("batch_size"), shape.pop("bptt")
    model = LSTMLanguageModel(ModelConfig(cell=cell, impl=impl, **shape), 10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.randint(0, 10_000, ((steps + 3) * bptt + 1, batch), generator=torch.Generator().manual_seed(0))
    state = model.init_state(batch)
    model.train()
    start = 0.0
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        x, y = data[i * bptt : (i + 1) * bptt], data[i * bptt + 1 : (i + 1) * bptt + 1]
        _, state = train_step(model, optimizer, x, y, state, clip=0.25, precision="fp32")
    print(steps * batch * bptt / (time.perf_counter() - start))


def recipe_shape(name: str) -> dict:
    """A built-in recipe's model section as the recipe writes it (cell and impl aside),
    its batch size and bptt: what every worker of this run builds."""
    from lstm_lm.config import load_config, read_yaml

    train = load_config(name).train  # and the recipe is valid
    model = {k: v for k, v in (read_yaml(name).get("model") or {}).items() if k not in ("cell", "impl")}
    return model | {"batch_size": train.batch_size, "bptt": train.bptt}


def measure(tree: Path, cell: str, impl: str, steps: int, shape: dict) -> float:
    env = os.environ | {"PYTHONPATH": str(tree)}  # ahead of the installed lstm_lm
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", cell, impl, str(steps), json.dumps(shape)]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git revision to compare with (run from a temporary worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--config", default="ptb-small", help="the built-in recipe whose model shape to train")
    parser.add_argument("--cells", help="comma-separated cells to time (default: every cell the recipe's model fits)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cell, impl, steps, shape = args.worker
        return worker(cell, impl, int(steps), json.loads(shape))
    from lstm_lm import cells
    from lstm_lm.config import ConfigError
    from lstm_lm.experiment import machine_name

    try:
        shape = recipe_shape(args.config)
    except ConfigError as e:
        parser.error(str(e))
    chosen = args.cells.split(",") if args.cells else cells.names()
    if unknown := [c for c in chosen if c not in cells.names()]:
        parser.error(cells.unknown(unknown[0]))
    # A cell fits the recipe's model when it reads every cell option the recipe sets (an LSTMP's proj_size).
    cell_options = {k for c in cells.names() for k in cells.get(c).options} & shape.keys()
    chosen = [c for c in chosen if cell_options <= set(cells.get(c).options)]
    if not chosen:
        parser.error(f"no chosen cell reads {sorted(cell_options)}, which {args.config} sets")

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
            rows = {name: [r for r in rows_of(tree) if r[0] in chosen] for name, tree in trees.items()}
            times: dict[tuple[str, str, str], list[float]] = {}
            for r in range(args.rounds):
                for cell, impl in rows["this"]:
                    for name, tree in trees.items():
                        if (cell, impl) in rows[name]:
                            rate = measure(tree, cell, impl, args.steps, shape)
                            times.setdefault((name, cell, impl), []).append(rate)
                            print(f"round {r + 1}: {name} {cell}/{impl}: {rate:,.0f} tokens/s", file=sys.stderr)
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    records = []
    model = ", ".join(f"{k} {v}" for k, v in shape.items())
    print(f"{machine_name('cpu')}; {args.config}'s model ({model}), float32, {args.rounds} rounds\n")
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
