"""`lstm-lm experiment cells`: every cell on one corpus, at one parameter count and one
wall-clock budget, each at the learning rate its own sweep picked.

    results = compare_cells(cells.names(), load_config("ptb-small"), CellBudget(minutes=3), "runs/cells")

What makes it fair:
- parameters: each cell gets the hidden size (every layer's; with tied weights the
  embedding's too, which must match it) whose model has the parameter count closest to
  the recipe's own model (counted on the meta device: nothing is allocated);
- time: each cell gets `minutes` of wall time on this machine, its sweep and its final
  validation and test included;
- learning rate: inside that budget, a short run at each candidate (the recipe's lr
  times each of `lr_factors`), `sweep_share` of the budget in all, scored on the first
  `sweep_tokens` tokens of the valid split; the best candidate then trains a fresh model
  for what is left of the budget, validating `points` times on the whole valid split.
Everything else (layers, dropout, optimizer, schedule, precision, seed) is the recipe's.

Writes results.json, results.csv, valid_vs_time.png and every run into `out_dir`; each
cell's row says the `lstm-lm train` command that repeats its final run on its own.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lstm_lm import cells as registry
from lstm_lm.cells.base import DEFAULT_HEADS
from lstm_lm.config import Config, ModelConfig, validate
from lstm_lm.data import Corpus
from lstm_lm.errors import ConfigError, LSTMLMError
from lstm_lm.experiment import machine_name
from lstm_lm.model import LSTMLanguageModel, cell_options
from lstm_lm.utils import log, shapes_only
from lstm_lm.writing import write_json, write_text


@dataclass
class CellBudget:
    """What every cell gets: the same minutes, the same sweep."""

    minutes: float = 5.0  # wall time per cell, sweep and final evaluation included
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)  # candidates: the recipe's lr times each
    sweep_share: float = 0.3  # of the budget, for the sweep's short runs together
    sweep_tokens: int = 20000  # of the valid split, to score a candidate
    points: int = 5  # validations of the final run (the curve's points), its last one included


def model_for(base: ModelConfig, cell: str, size: int) -> ModelConfig:
    """The recipe's model with `cell` at `size` units per layer: the recipe's options
    that `cell` does not read are dropped (and weight drop, for a cell with no recurrent
    matrix); with tied weights and no projection the embedding follows the size."""
    spec = registry.get(cell)
    options = {name: None for other in registry.names() for name in registry.get(other).options}  # every cell's
    options |= {name: getattr(base, name) for name in spec.options}
    model = dataclasses.replace(base, cell=cell, hidden_size=size, hidden_sizes=None, impl="auto", **options)
    if not spec.dropped:
        model = dataclasses.replace(model, weight_drop=0.0)
    if base.tie_weights and not model.proj_size:
        model = dataclasses.replace(model, embedding_size=size)
    return model


def parameter_count(model: ModelConfig, vocab_size: int) -> int:
    with shapes_only():
        return LSTMLanguageModel(model, vocab_size).num_parameters()


def matched_model(base: ModelConfig, cell: str, vocab_size: int, target: int) -> ModelConfig:
    """`model_for(base, cell, size)` at the size whose parameter count is closest to `target`
    (sizes in steps of the heads for a cell with heads; counts grow with the size)."""
    step = (base.num_heads or DEFAULT_HEADS) if "num_heads" in registry.get(cell).options else 1
    low, high = 1, 8192 // step  # multiples of step, as j * step
    while low < high:  # the smallest size whose count reaches the target
        mid = (low + high) // 2
        if parameter_count(model_for(base, cell, mid * step), vocab_size) < target:
            low = mid + 1
        else:
            high = mid
    sizes = [j * step for j in (low - 1, low) if j >= 1]
    best = min(sizes, key=lambda s: abs(parameter_count(model_for(base, cell, s), vocab_size) - target))
    return model_for(base, cell, best)


def sweep_corpus(corpus: Corpus, tokens: int) -> Corpus:
    """The corpus with its valid and test splits cut to their first `tokens` (a sweep's score)."""
    splits = dict(corpus.splits)
    splits["valid"], splits["test"] = splits["valid"][:tokens], splits["test"][: min(tokens, 2000)]
    return dataclasses.replace(corpus, splits=splits)


def _run(cfg: Config, run_dir: Path, corpus: Corpus, started: float) -> tuple[dict | None, str]:
    """One training run, timed from `started`: its summary, or None and why it failed
    (a learning rate too high for the cell diverges; a budget too small leaves no time)."""
    from lstm_lm.training.train import train

    try:
        return train(cfg, run_dir, corpus=corpus, started=started, overwrite=True), ""
    except LSTMLMError as e:
        why = str(e).splitlines()[0][:300]
        log(f"  {run_dir.name}: {why}")
        return None, why


def curve(run_dir: Path) -> tuple[list[list[float]], int, float]:
    """From the run's metrics.jsonl: [elapsed s, valid ppl] per validation, and the tokens
    trained on and the training seconds (each epoch's last record holds its totals)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {r["epoch"]: r for r in records}  # each epoch's last record
    tokens = sum(r["tokens_per_s"] * r["epoch_time_s"] for r in last.values())
    seconds = sum(r["epoch_time_s"] for r in last.values())
    return [[r["elapsed_s"], r["val_ppl"]] for r in records], round(tokens), seconds


def sweep_lr(
    base: Config, cell: str, corpus: Corpus, budget: CellBudget, out_dir: Path
) -> tuple[dict[str, float | None], dict[float, float], str]:
    """Short runs at each of the budget's learning rates, scored on the start of the valid split.

    Returns each rate's best valid perplexity (None where it diverged), each rate's steps per
    second, and why the last failed run failed.
    """
    trial_minutes = budget.minutes * budget.sweep_share / len(budget.lr_factors)
    small = sweep_corpus(corpus, budget.sweep_tokens)
    sweep, speeds, why = {}, {}, ""
    for factor in budget.lr_factors:
        lr = base.train.lr * factor
        log(f"== {cell}: {base.model.hidden_size} units, lr {lr:g} for {trial_minutes:.2f} min (sweep)")
        trial = dataclasses.replace(
            base, train=dataclasses.replace(base.train, lr=lr, time_budget=trial_minutes, eval_every=None)
        )
        t0 = time.perf_counter()
        summary, why = _run(trial, out_dir / "sweep" / f"{cell}-lr{lr:g}", small, time.perf_counter())
        finite = summary is not None and summary["best_valid_perplexity"] is not None
        sweep[f"{lr:g}"] = summary["best_valid_perplexity"] if finite else None
        speeds[lr] = summary["steps"] / (time.perf_counter() - t0) if summary else 0.0
    return sweep, speeds, why


def train_cell(
    cell: str,
    base: Config,
    corpus: Corpus,
    target: int,
    budget: CellBudget,
    out_dir: Path,
    recipe: str | None,
    overrides: Sequence[str] = (),
) -> dict:
    """Sweep, then train: one cell's row of the table."""
    model = matched_model(base.model, cell, corpus.vocab_size, target)
    started = time.perf_counter()
    sweep, speeds, why = sweep_lr(dataclasses.replace(base, model=model), cell, corpus, budget, out_dir)
    scored = {float(lr): ppl for lr, ppl in sweep.items() if ppl is not None and math.isfinite(ppl)}
    if not scored:
        failed = f"no learning rate of the sweep trained: {why}"
        return {"hidden_size": model.hidden_size, "sweep": sweep, "failed": failed}
    lr = min(scored, key=scored.get)
    left_s = budget.minutes * 60 - (time.perf_counter() - started)
    every = max(1, int(speeds[lr] * left_s / max(budget.points, 1)))
    # The final run gets the minutes left as its own budget, on its own clock: a schedule over
    # the budget (cosine) spans the final run, as in its row's `lstm-lm train` command.
    t = dataclasses.replace(base.train, lr=lr, eval_every=every, time_budget=left_s / 60)
    final = dataclasses.replace(base, model=model, train=t)
    log(f"== {cell}: lr {lr:g} (sweep: {sweep}); training for the {left_s / 60:.2f} min left")
    run_dir = out_dir / "runs" / cell
    final_start = time.perf_counter()
    summary, why = _run(final, run_dir, corpus, final_start)
    if summary is None:
        return {"hidden_size": model.hidden_size, "sweep": sweep, "lr": lr, "failed": f"the final run failed: {why}"}
    points, tokens, seconds = curve(run_dir)
    points = [[round(s + final_start - started, 2), ppl] for s, ppl in points]  # on the cell's clock
    return {
        "hidden_size": model.hidden_size,
        "embedding_size": model.embedding_size,
        "parameters": parameter_count(model, corpus.vocab_size),
        "lr": lr,
        "sweep": sweep,
        "tokens_per_s": round(tokens / max(seconds, 1e-9)),
        "tokens": tokens,
        "steps": summary["steps"],
        "valid_perplexity": summary["best_valid_perplexity"],
        "test_perplexity": summary["test_perplexity"],
        "test_top1_accuracy": summary["test_top1_accuracy"],
        "wall_s": round(time.perf_counter() - started, 1),
        "curve": points,
        "command": train_command(final, left_s / 60, recipe, overrides),
    }


def train_command(cfg: Config, minutes: float, recipe: str | None, overrides: Sequence[str] = ()) -> str:
    """The `lstm-lm train` command that repeats a final run on its own, in `minutes`: the
    experiment's own --set overrides, then the row's."""
    m, t = cfg.model, cfg.train
    sets = {
        "model.cell": m.cell,
        "model.hidden_size": m.hidden_size,
        "model.embedding_size": m.embedding_size,
        **{f"model.{k}": v for k, v in cell_options(m).items()},
        "train.lr": f"{t.lr:g}",
        "train.eval_every": t.eval_every,
        "train.time_budget": f"{minutes:.2f}",
    }
    args = ["lstm-lm", "train", *(["--config", recipe] if recipe else []), "--data", cfg.data.source]
    args += [a for o in overrides for a in ("--set", o)]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return shlex.join(args)


def compare_cells(
    chosen: list[str],
    base: Config,
    budget: CellBudget,
    out_dir: str | Path,
    recipe: str | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Train every chosen cell as the module docstring says; write and return the results."""
    from lstm_lm.data import load_corpus

    problems = validate(base)
    if problems:
        raise ConfigError(problems, "the recipe")
    corpus = load_corpus(base.data)  # once for every cell, before anything is written
    # A diverged run trains on to the end of its share: one that ended early would leave its
    # cell's final run more minutes than another cell's.
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, stop_diverged=False))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = parameter_count(base.model, corpus.vocab_size)
    results: dict = {
        "experiment": "cells",
        "corpus": base.data.source,
        "recipe": recipe,
        "recipe_cell": base.model.cell,
        "target_parameters": target,
        "budget": asdict(budget),
        "machine": machine_name(base.train.device),
        "cells": {},
    }
    for cell in chosen:
        results["cells"][cell] = train_cell(cell, base, corpus, target, budget, out_dir, recipe, overrides)
        write_results(results, out_dir)  # after every cell: a stopped experiment keeps what it measured
    return results


COLUMNS = ("parameters", "lr", "tokens_per_s", "tokens", "valid_perplexity", "test_perplexity", "test_top1_accuracy")


def write_results(results: dict, out_dir: Path) -> None:
    write_json(out_dir / "results.json", results)
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["cell", "hidden_size", *COLUMNS])
    for cell, r in results["cells"].items():
        w.writerow([cell, r["hidden_size"], *(r.get(c, "") for c in COLUMNS)])
    write_text(out_dir / "results.csv", table.getvalue())


def results_table(results: dict) -> str:
    """One row per cell, as aligned text: the table docs/cells.md shows."""
    head = f"{'cell':<10} {'units':>5} {'params':>10} {'lr':>7} {'tok/s':>8} {'tokens':>11} "
    head += f"{'valid ppl':>9} {'test ppl':>9} {'top-1':>6}"
    rows = [head]
    for cell, r in results["cells"].items():
        if "failed" in r:
            rows.append(f"{cell:<10} {r['hidden_size']:>5} {r['failed']}")
            continue
        rows.append(
            f"{cell:<10} {r['hidden_size']:>5} {r['parameters']:>10,} {r['lr']:>7g} {r['tokens_per_s']:>8,} "
            f"{r['tokens']:>11,} {r['valid_perplexity']:>9.2f} {r['test_perplexity']:>9.2f} "
            f"{100 * r['test_top1_accuracy']:>5.1f}%"
        )
    return "\n".join(rows)


def cells_command(
    config: str | None,
    data: str | None,
    overrides: list[str],
    cells: str,
    lr_factors: str,
    budget: CellBudget,
    out_dir: Path,
) -> str:
    """`lstm-lm experiment cells`: check the options, run, draw; the table it prints."""
    from lstm_lm.config import demo_config, load_config
    from lstm_lm.experiment import parse_list
    from lstm_lm.plots import PLOT_HINT, plot_cell_comparison

    chosen = list(registry.names()) if cells.strip() == "all" else parse_list(cells, "cells", registry.names())
    try:
        factors = tuple(float(f) for f in lr_factors.split(",") if f.strip())
    except ValueError:
        factors = ()
    if not factors or any(not (math.isfinite(f) and f > 0) for f in factors):
        raise ConfigError(
            [f"--lr-factors: positive numbers, comma-separated, such as 0.5,1,2; got {lr_factors!r}"], "command line"
        )
    if not 0 < budget.sweep_share < 1:
        raise ConfigError([f"--sweep-share: between 0 and 1, got {budget.sweep_share:g}"], "command line")
    values = {"data.source": data} if data is not None else {}
    base = (
        demo_config(overrides, values)
        if config is None and data is None
        else load_config(config, overrides, values=values)
    )
    budget = dataclasses.replace(budget, lr_factors=factors)
    results = compare_cells(chosen, base, budget, out_dir, config, overrides)
    png = plot_cell_comparison(results, out_dir / "valid_vs_time.png")
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'}" + (f" and {png}" if png else ""))
    if png is None:
        log(PLOT_HINT)
    return results_table(results)
