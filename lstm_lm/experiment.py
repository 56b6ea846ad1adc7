"""The long-range experiment: how far back can each cell remember?

    results = long_range(gaps=[0, 5, 10, 20, 40], cells=cells.names(), out_dir="runs/long-range")

Each cell is trained on one corpus of demo biographies, half with gaps of 0 to 10
words between "I am from X" and "and I speak Y" and half with 0 to max(gaps) (see
`write_corpus`), with the same number of parameters (the hidden size is chosen per
cell to match the LSTM's count) and the same number of steps.
Then, on fresh biographies with exactly `gap` words in between, it is asked for the
word after "I speak": the top-1 accuracy as a function of the gap is the measure.
A simple RNN rewrites its whole state at every step, so the region fades over a
long gap (and its gradient vanishes on the way back); the LSTM's forget gate can
keep it in the memory cell.
"""

from __future__ import annotations

import csv
import io
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lstm_lm import cells as registry
from lstm_lm.cells.base import DEFAULT_HEADS
from lstm_lm.checkpoint import load_checkpoint
from lstm_lm.config import Config, config_from_dict
from lstm_lm.demo import biography
from lstm_lm.errors import ConfigError
from lstm_lm.inference.sample import encode_prompt
from lstm_lm.model import LSTMLanguageModel
from lstm_lm.utils import log
from lstm_lm.writing import write_json, write_text


@dataclass
class Budget:
    """What every cell gets: the same data, parameter count and number of steps."""

    steps: int = 5000  # optimizer steps per cell
    lstm_hidden: int = 128  # the LSTM's units; the other cells get as many parameters
    embedding_size: int = 64
    batch_size: int = 32
    bptt: int | None = None  # null: the largest gap + 40, so that a chunk holds a whole sentence
    lr: float = 0.01  # AdamW
    demo_size: int = 20000  # training biographies
    probes: int = 300  # held-out sentences per gap
    seed: int = 0
    device: str = "cpu"


def recurrent_parameters(cell: str, embedding_size: int, hidden: int) -> int:
    """Weights and biases of one recurrent layer of `cell`, as the cell declares them."""
    return registry.get(cell)(embedding_size, hidden).num_parameters()


def matched_hidden_size(cell: str, budget: Budget, vocab_size: int) -> int:
    """The hidden size that gives `cell` about as many parameters as the LSTM of `budget`."""

    def total(c: str, h: int) -> int:  # untied embedding, one layer, decoder with bias
        return (
            vocab_size * budget.embedding_size
            + recurrent_parameters(c, budget.embedding_size, h)
            + h * vocab_size
            + vocab_size
        )

    target = total("lstm", budget.lstm_hidden)
    step = DEFAULT_HEADS if "num_heads" in registry.get(cell).options else 1  # sizes the heads divide
    return min(range(step, 8 * budget.lstm_hidden, step), key=lambda h: abs(total(cell, h) - target))


SHORT_GAPS = 10  # half of the training biographies have gaps of 0 to this many words


def write_corpus(folder: Path, gap_max: int, budget: Budget) -> Path:
    """The training text, written out so that it can be read: train/valid/test.txt of
    demo biographies, half with gaps of 0 to SHORT_GAPS words, half with 0 to gap_max.

    The short half is what lets a model find the region-to-language link early on
    (with gaps of up to 40 words alone, none of the cells found it within the step
    budget); the other half asks it to hold that link across every gap measured.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_eval = max(1, budget.demo_size // 20)
    for split, n in (("train", budget.demo_size), ("valid", n_eval), ("test", n_eval)):
        rng = random.Random(f"long-range-{split}-{budget.seed}")
        lines = [biography(rng, 0, min(SHORT_GAPS, gap_max) if i % 2 == 0 else gap_max) for i in range(n)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def experiment_config(cell: str, hidden: int, budget: Budget, corpus: Path, bptt: int) -> Config:
    return config_from_dict(
        {
            "data": {"source": str(corpus), "tokenizer": "word", "split_punctuation": True},
            "model": {
                "cell": cell,
                "embedding_size": budget.embedding_size,
                "hidden_size": hidden,
                "num_layers": 1,
                "dropout": 0.0,
                "tie_weights": False,
            },
            "train": {
                "epochs": 1000,
                "max_steps": budget.steps,
                "batch_size": budget.batch_size,
                "bptt": bptt,
                "optimizer": "adamw",
                "lr": budget.lr,
                "schedule": "cosine",
                "min_lr": budget.lr / 10,
                "clip": 1.0,
                "precision": "fp32",
                "device": budget.device,
                "seed": budget.seed + 1111,
                "checkpoint_minutes": None,
                "keep_last": 1,
                "stop_diverged": False,  # every cell trains its steps, and a diverged one gets its row
            },
        },
        origin="experiment",
    )


def probe_sentences(gap: int, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` fresh biographies with exactly `gap` words between region and language, as
    (the text up to "I speak", the language)."""
    rng = random.Random(f"long-range-probe-{seed}-{gap}")
    pairs = []
    for _ in range(n):
        head, _, tail = biography(rng, gap, gap).partition(" I speak ")
        pairs.append((head + " I speak", tail.split(".")[0]))
    return pairs


@torch.no_grad()
def language_accuracy(model: LSTMLanguageModel, tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Top-1 accuracy of the word after each prompt, read from a zero state after <eos>
    as `lstm-lm complete` reads a prompt. Prompts of one length run as one batch."""
    model.eval()
    device = model.embedding.weight.device
    by_length: dict[int, list[tuple[list[int], int]]] = {}
    for prompt, answer in pairs:
        ids = encode_prompt(tokenizer, prompt)
        by_length.setdefault(len(ids), []).append((ids, tokenizer.token_to_id(answer)))
    right = 0
    for group in by_length.values():
        x = torch.tensor([ids for ids, _ in group], device=device).t()  # (T, B)
        logits, _ = model(x)
        guesses = logits[-1].argmax(-1).tolist()
        right += sum(g == answer for g, (_, answer) in zip(guesses, group))
    return right / len(pairs)


def machine_name(device: str) -> str:
    """What ran it, for the record: the GPU's name, or the CPU's model (with its family and
    model numbers and whether it has AVX-512 BF16 and AMX, which decide bf16's speed) and threads."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        info = dict(
            (key.strip(), value.strip())
            for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
            if ":" in line
            for key, value in [line.split(":", 1)]
        )
        flags = set(info.get("flags", "").split())
        isa = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")) if flag in flags]
        cpu = f"{info.get('model name', cpu)} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}"
        cpu += f"; {', '.join(isa) if isa else 'no AVX-512 BF16, no AMX'})"
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def parse_list(text: str, what: str, allowed: tuple[str, ...] | None = None) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError([f"--{what}: give a comma-separated list, got {text!r}"], "command line")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ConfigError(
                [f"--{what}: {', '.join(bad)} unknown (choose from {', '.join(allowed)})"], "command line"
            )
        return items
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise ConfigError(
            [f"--{what}: expected whole numbers of words such as 0,5,10,20,40, got {text!r}"], "command line"
        ) from None
    if any(v < 0 or v > 500 for v in values):
        raise ConfigError([f"--{what}: each gap must be between 0 and 500 words, got {text!r}"], "command line")
    return sorted(set(values))


def long_range(gaps: list[int], cells: list[str], out_dir: str | Path, budget: Budget | None = None) -> dict:
    """Train each cell, measure its accuracy at each gap; write results.json, results.csv
    and (with matplotlib) accuracy_vs_gap.png into `out_dir`. Returns the results."""
    from lstm_lm.data import load_corpus
    from lstm_lm.training.train import train

    bad = [cell for cell in cells if cell not in registry.names()]
    if bad:
        raise ConfigError(
            [f"cell {', '.join(bad)} unknown (choose from {', '.join(registry.names())})"], "command line"
        )
    budget = budget or Budget()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gap_max = max(gaps)
    bptt = budget.bptt or gap_max + 40  # a sentence with a 40-word gap is about 60 tokens
    started = time.perf_counter()
    results: dict = {
        "experiment": "long-range",
        "gaps": gaps,
        "budget": asdict(budget) | {"bptt": bptt},
        "cells": {},
        "machine": machine_name(budget.device),
    }
    corpus_dir = write_corpus(out_dir / "corpus", gap_max, budget)
    corpus = load_corpus(experiment_config("lstm", budget.lstm_hidden, budget, corpus_dir, bptt).data)  # once for all
    for cell in cells:
        hidden = matched_hidden_size(cell, budget, corpus.vocab_size)
        log(f"== {cell}: {hidden} units, {budget.steps} steps, gaps 0-{gap_max} in training")
        run_dir = out_dir / "runs" / cell
        t0 = time.perf_counter()
        summary = train(
            experiment_config(cell, hidden, budget, corpus_dir, bptt), run_dir, corpus=corpus, overwrite=True
        )
        train_s = time.perf_counter() - t0
        model, tokenizer, _ = load_checkpoint(run_dir, budget.device)
        accuracy = {}
        for gap in gaps:
            accuracy[gap] = language_accuracy(model, tokenizer, probe_sentences(gap, budget.probes, budget.seed))
            log(f"{cell} gap {gap:3d}: {accuracy[gap]:.1%}")
        results["cells"][cell] = {
            "hidden_size": hidden,
            "parameters": model.num_parameters(),
            "steps": summary["steps"],
            "valid_perplexity": summary["best_valid_perplexity"],
            "train_s": round(train_s, 1),
            "accuracy": {str(g): a for g, a in accuracy.items()},
        }
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write_results(results, out_dir)
    return results


def long_range_command(gaps: str, cells: str, out_dir: Path, budget: Budget) -> str:
    """`lstm-lm experiment long-range`: parse its lists, run, draw; the table it prints."""
    from lstm_lm.config import is_device_name
    from lstm_lm.plots import PLOT_HINT, plot_long_range

    if not is_device_name(budget.device):
        raise ConfigError([f"--device: must be auto, cpu, cuda, cuda:N or mps, got {budget.device!r}"], "command line")
    chosen = list(registry.names()) if cells.strip() == "all" else parse_list(cells, "cells", registry.names())
    results = long_range(parse_list(gaps, "gaps"), chosen, out_dir, budget)
    png = plot_long_range(results, out_dir / "accuracy_vs_gap.png")
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'}" + (f" and {png}" if png else ""))
    if png is None:
        log(PLOT_HINT)
    return results_table(results)


def write_results(results: dict, out_dir: Path) -> None:
    write_json(out_dir / "results.json", results)
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["cell", "hidden_size", "parameters", *(f"gap_{g}" for g in results["gaps"])])
    for cell, r in results["cells"].items():
        w.writerow(
            [cell, r["hidden_size"], r["parameters"], *(f"{r['accuracy'][str(g)]:.4f}" for g in results["gaps"])]
        )
    write_text(out_dir / "results.csv", table.getvalue())


def results_table(results: dict) -> str:
    """Accuracy (%) per cell and gap, as aligned text."""
    gaps = results["gaps"]
    width = max(len("cell"), *(len(cell) for cell in results["cells"]))
    head = f"{'cell':<{width}} {'units':>5} {'params':>8} " + " ".join(f"{'gap ' + str(g):>7}" for g in gaps)
    rows = [head]
    for cell, r in results["cells"].items():
        accs = " ".join(f"{100 * r['accuracy'][str(g)]:6.1f}%" for g in gaps)
        rows.append(f"{cell:<{width}} {r['hidden_size']:>5} {r['parameters']:>8,} {accs}")
    return "\n".join(rows)
