"""Training speed of every cell, against the same cells in an earlier version of lstm-lm.

    python scripts/bench_cells.py --baseline e7482a4      # the version before lstm_lm/cells/
    python scripts/bench_cells.py                          # this version's cells only
    python scripts/bench_cells.py --config ptb-cpu-30min --cells lstm,cifg --baseline 1a66d2b

Each measurement is its own process (`--worker`): a model of one cell and engine,
shaped as a built-in recipe's model section (`--config`, ptb-small by default: 2x200,
tied, 10k words) on batches of its batch size and bptt, a few untimed steps, then
`--steps` timed steps of lstm-lm's training step (in float32, or `--precision bf16`), then
one timed `evaluate` pass over the same tokens at batch 10. The baseline runs from a
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


def worker(cell: str, impl: str, steps: int, shape: dict, precision: str) -> None:
    """Runs inside the version under test (its lstm_lm first on sys.path): print the
    training step's tokens/s and evaluate()'s (batch 10), one line each.
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
    from lstm_lm.evaluation.evaluate import evaluate

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
        _, state = train_step(model, optimizer, x, y, state, clip=0.25, precision=precision)
    print(steps * batch * bptt / (time.perf_counter() - start))
    stream = data[: steps * bptt + 1].t().reshape(-1)[: (steps * batch * bptt) // 10 * 10]
    stream = stream.view(10, -1).t().contiguous()  # (T, 10): evaluation's batch of 10 streams
    evaluate(model, stream[: bptt + 1], bptt, precision)  # untimed: the first pass allocates
    start = time.perf_counter()
    tokens = evaluate(model, stream, bptt, precision)["tokens"]
    print(tokens / (time.perf_counter() - start))


def recipe_shape(name: str) -> dict:
    """A built-in recipe's model section as the recipe writes it (cell and impl aside),
    its batch size and bptt: what every worker of this run builds."""
    from lstm_lm.config import load_config, read_yaml

    train = load_config(name).train  # and the recipe is valid
    model = {k: v for k, v in (read_yaml(name).get("model") or {}).items() if k not in ("cell", "impl")}
    return model | {"batch_size": train.batch_size, "bptt": train.bptt}


def measure(tree: Path, cell: str, impl: str, steps: int, shape: dict, precision: str) -> tuple[float, float]:
    """(training, evaluation) tokens/s of one worker process."""
    env = os.environ | {"PYTHONPATH": str(tree)}  # ahead of the installed lstm_lm
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", cell, impl, str(steps), json.dumps(shape)]
    done = subprocess.run(command + [precision], env=env, capture_output=True, text=True, check=True, cwd=tree)
    train, evaluation = done.stdout.strip().splitlines()[-2:]
    return float(train), float(evaluation)


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
    parser.add_argument(
        "--precision", default="fp32", help="fp32 (default), bf16, or auto (this machine's precision: auto)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cell, impl, steps, shape, precision = args.worker
        return worker(cell, impl, int(steps), json.loads(shape), precision)
    import torch

    from lstm_lm import cells
    from lstm_lm.config import ConfigError
    from lstm_lm.experiment import machine_name
    from lstm_lm.utils import pick_precision

    try:
        shape = recipe_shape(args.config)
    except ConfigError as e:
        parser.error(str(e))
    if args.precision not in ("fp32", "bf16", "auto"):
        parser.error(f"--precision: fp32, bf16 or auto, got {args.precision!r}")
    precision = pick_precision(args.precision, torch.device("cpu"))
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
                            rates = measure(tree, cell, impl, args.steps, shape, precision)
                            times.setdefault((name, cell, impl), []).append(rates)
                            print(
                                f"round {r + 1}: {name} {cell}/{impl}: {rates[0]:,.0f} tokens/s training, "
                                f"{rates[1]:,.0f} evaluating",
                                file=sys.stderr,
                            )
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    records = []
    model = ", ".join(f"{k} {v}" for k, v in shape.items())
    print(f"{machine_name('cpu')}; {args.config}'s model ({model}), {precision}, {args.rounds} rounds\n")
    print("| cell | engine | train tokens/s | baseline | ratio | eval tokens/s | baseline | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for cell, impl in rows["this"]:
        record = {"cell": cell, "impl": impl, "precision": precision}
        cells_text = []
        for i, phase in enumerate(("train", "eval")):
            ours = [t[i] for t in times[("this", cell, impl)]]
            theirs = [t[i] for t in times.get(("baseline", cell, impl), [])]
            ratio = statistics.median(a / b for a, b in zip(ours, theirs)) if theirs else None
            record |= {
                f"{phase}_tokens_per_s": statistics.median(ours),
                f"baseline_{phase}_tokens_per_s": statistics.median(theirs) if theirs else None,
                f"{phase}_ratio": ratio,
            }
            base_text = f"{statistics.median(theirs):,.0f}" if theirs else "(new)"
            cells_text += [f"{statistics.median(ours):,.0f}", base_text, f"{ratio:.2f}" if ratio else ""]
        records.append(record)
        print(f"| {cell} | {impl} | " + " | ".join(cells_text) + " |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
