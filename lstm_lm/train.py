"""Training: truncated BPTT with SGD (or AdamW), gradient clipping, a learning-rate
schedule (plateau decay, or warm-up and cosine), optional NT-ASGD weight averaging
and an optional wall-time budget.

    summary = train(load_config("configs/ptb-small.yaml"), out_dir="runs/ptb-small")

The run directory is a checkpoint (see checkpoint.py) holding the best model by
validation loss, plus `metrics.jsonl` (one line per validation) and the training
state that `resume=True` continues from.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lstm_lm.checkpoint import (
    CONFIG, TRAINING_STATE, WEIGHTS, load_config_json, load_training_state, save_checkpoint,
    save_training_state, update_latest,
)
from lstm_lm.config import Config, TrainConfig
from lstm_lm.data import Corpus, batchify, get_batch, load_corpus, to_tensor
from lstm_lm.errors import CheckpointError, ConfigError, DataError, TrainingError
from lstm_lm.evaluate import evaluate
from lstm_lm.model import LSTMLanguageModel, State, detach_state
from lstm_lm.optim import WeightAverage, make_optimizer, nt_asgd_triggers, scheduled_lr
from lstm_lm.utils import autocast, log, pick_device, pick_precision

METRICS = "metrics.jsonl"


def train_step(
    model: LSTMLanguageModel, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    hidden: State, clip: float, precision: str = "fp32", loss_fn: Callable | None = None,
    ar: float = 0.0, tar: float = 0.0,
) -> tuple[torch.Tensor, State]:
    """One step of truncated BPTT: forward, backward, clip, update. Returns the
    cross-entropy (on the device, without AR/TAR) and the new state.

    `loss_fn` replaces `model.training_loss` (with the same arguments), e.g. its compiled version.
    """
    # The memory (h, c) carries on from the previous chunk, but the gradient stops here;
    # otherwise backward would run through the whole epoch.
    hidden = detach_state(hidden)
    with autocast(x.device, precision):  # bf16 matrix products; the loss stays float32
        objective, loss, hidden = (loss_fn or model.training_loss)(x, y, hidden, ar, tar)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.detach(), hidden


def compile_loss(model: LSTMLanguageModel) -> Callable:
    """`model.training_loss` compiled with torch.compile: embedding, dropout, the LSTM
    and the fused output layer + loss, forward and backward. With the hand-written
    cell that is one graph, its whole time loop included; the fused nn.LSTM kernel is
    called as an opaque op inside it. Inductor fuses the element-wise work (the gates,
    the dropout masks, the softmax), which is where a CPU spends the time matrix
    products do not.

    Compilation happens on the first call and again for each new input shape; the
    model itself is unchanged, so checkpoints are the same.
    """
    return torch.compile(model.training_loss, dynamic=False)


def chunk_length(t: TrainConfig, step: int) -> int:
    """Time steps of the chunk at optimizer step `step`: bptt, or with variable_bptt a
    length drawn as AWD-LSTM does. Drawn from (seed, step) alone, so a resumed run
    draws the same lengths."""
    if not t.variable_bptt:
        return t.bptt
    rng = random.Random(t.seed * 1_000_003 + step)
    mean = t.bptt if rng.random() < 0.95 else t.bptt / 2
    return max(5, int(rng.gauss(mean, 5)))


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class Clock:
    """Wall time of the run (earlier sessions of a resumed run included) against its budget.

    The budget covers the final validation and test evaluation too: `reserve_s`, the
    time they are expected to take, is kept free. `time_reserve` sets it from a timed
    evaluation: a short probe before training, then each full validation.
    """

    def __init__(self, budget_min: float | None, elapsed_before: float = 0.0, start: float | None = None):
        self.budget_s = budget_min * 60 if budget_min else None
        self.before, self.start = elapsed_before, start if start is not None else time.perf_counter()
        self.reserve_s = 0.0

    def time_reserve(self, seconds: float, tokens: int, eval_tokens: int) -> None:
        """Evaluating `tokens` took `seconds`: reserve enough for `eval_tokens`, with a margin."""
        self.reserve_s = 1.2 * seconds * eval_tokens / max(tokens, 1) + 1.0

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def progress(self) -> float:
        """Share of the training time used, 0 -> 1 (under a budget)."""
        return self.elapsed() / max(self.budget_s - self.reserve_s, 1e-9)

    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.elapsed() + self.reserve_s >= self.budget_s


def train(cfg: Config, out_dir: str | Path, resume: bool = False, corpus: Corpus | None = None,
          started: float | None = None) -> dict[str, Any]:
    """Train (or with `resume`, continue) a run in `out_dir`; returns a summary of the run.

    `started` (a time.perf_counter() value, default now) is when the run's clock starts:
    the command line passes the moment the command began, before torch was imported.
    """
    run_dir = Path(out_dir)
    t = cfg.train
    clock = Clock(t.time_budget, start=started)
    device = pick_device(t.device)
    torch.manual_seed(t.seed)

    corpus = corpus or load_corpus(cfg.data)
    if corpus.source.kind in ("dir", "file"):
        cfg.data.source = str(Path(cfg.data.source).expanduser().resolve())  # eval finds it from anywhere
    train_ids, valid_ids = corpus.splits["train"], corpus.splits["valid"]
    if len(train_ids) < t.batch_size * 2:
        raise DataError(
            f"the train split has {len(train_ids)} tokens, fewer than two per stream at batch size "
            f"{t.batch_size}; use more text or a smaller --batch-size"
        )
    if len(valid_ids) < t.eval_batch_size * 2:
        raise DataError(f"the valid split has {len(valid_ids)} tokens, too few for eval_batch_size {t.eval_batch_size}")
    train_data = batchify(to_tensor(train_ids, device), t.batch_size)  # (T, B), kept on the device
    valid_data = batchify(to_tensor(valid_ids, device), t.eval_batch_size)
    rows = train_data.size(0) - 1  # positions a chunk can start from
    n_batches = math.ceil(rows / t.bptt)  # per epoch (about that many with variable_bptt)

    model = LSTMLanguageModel(cfg.model, corpus.vocab_size).to(device)
    precision = pick_precision(t.precision, device)
    compiled_loss = compile_loss(model) if t.compile else None
    first_step = True
    optimizer = make_optimizer(cfg, model)
    state: dict[str, Any] = {
        "epoch": 1, "batch": 0, "pos": 0, "step": 0, "lr": t.lr, "last_lr": t.lr, "best_val_loss": None,
        "epoch_loss_sum": 0.0, "epoch_tokens": 0, "train_time_s": 0.0, "elapsed_s": 0.0,
        "val_losses": [], "averaging_since": None,
    }
    hidden = None
    average: WeightAverage | None = None
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        saved, hidden, extra = load_training_state(run_dir, model, optimizer, device)
        saved.setdefault("pos", saved["batch"] * t.bptt)  # a state saved before variable_bptt existed
        state |= saved
        if state["averaging_since"] is not None:
            average = WeightAverage(model, count=int(extra["average.count"].item()),
                                    averages=[extra[f"average.{i}"] for i in range(len(list(model.parameters())))])
        if state["epoch"] > t.epochs or (t.max_steps is not None and state["step"] >= t.max_steps):
            raise ConfigError([
                f"nothing to resume: {run_dir} already ran {state['step']} steps into epoch {state['epoch']}; "
                "raise --epochs or --max-steps (or --set train.max_steps=null)"
            ])
        log(f"resuming {run_dir} at epoch {state['epoch']}, step {state['step']}")
    else:
        (run_dir / METRICS).unlink(missing_ok=True)
        (run_dir / TRAINING_STATE).unlink(missing_ok=True)
    clock.before = state["elapsed_s"]
    if t.time_budget and clock.out_of_time():
        raise ConfigError([f"nothing to resume: {run_dir} already used its time budget of {t.time_budget:g} "
                           "minutes; raise --time-budget"])
    planned_steps = t.max_steps or t.epochs * n_batches
    log(
        f"model: {model.num_parameters():,} parameters, impl {model.impl}, vocab {corpus.vocab_size:,}, "
        f"device {device}, precision {precision}{', compiled' if t.compile else ''}; "
        f"data: {len(train_ids):,} train tokens, {n_batches:,} batches of {t.batch_size}x{t.bptt} per epoch"
        + (f"; time budget {t.time_budget:g} min" if t.time_budget else "")
    )

    def progress() -> float:
        """How far through the run: the schedule's clock."""
        return clock.progress() if t.time_budget else state["step"] / planned_steps

    def should_stop() -> bool:
        return (t.max_steps is not None and state["step"] >= t.max_steps) or clock.out_of_time()

    if t.time_budget:
        _probe_evaluation_time(model, valid_data, t.bptt, precision, clock, len(valid_ids) + len(corpus.splits["test"]))

    while state["epoch"] <= t.epochs and not should_stop():
        model.train()
        if hidden is None or state["pos"] == 0:
            hidden = model.init_state(t.batch_size, device)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        pending = 0
        bar = tqdm(total=n_batches, initial=state["batch"], desc=f"epoch {state['epoch']}", unit="batch",
                   file=sys.stderr, disable=None, dynamic_ncols=True, leave=False)
        while state["pos"] < rows and not should_stop():
            seq_len = chunk_length(t, state["step"])
            x, y = get_batch(train_data, state["pos"], seq_len)
            lr = state["last_lr"] = scheduled_lr(t, state["lr"], state["step"], progress())
            # Variable-length chunks: a longer one carries more tokens, so it takes a longer step.
            for group in optimizer.param_groups:
                group["lr"] = lr * x.size(0) / t.bptt if t.variable_bptt else lr
            step_start = time.perf_counter()
            # A chunk of another length (the epoch's last) runs eagerly rather than compiling anew.
            loss_fn = compiled_loss if x.size(0) == t.bptt else None
            loss, hidden = train_step(model, optimizer, x, y, hidden, t.clip, precision, loss_fn, t.ar, t.tar)
            if average is not None:
                average.update()
            if first_step and loss_fn is not None:
                first_step = False
                loss.item()  # wait for the step, so the time is the compilation's
                log(f"compiled the model in {time.perf_counter() - step_start:.1f} s (first step included)")
            loss_sum += loss * y.numel()
            state["epoch_tokens"] += y.numel()
            state["step"] += 1
            state["batch"] += 1
            state["pos"] += x.size(0)
            pending += 1
            bar.update(1)
            if pending == t.log_interval or state["pos"] >= rows:
                state["epoch_loss_sum"] += loss_sum.item()  # the one sync every log_interval steps
                loss_sum.zero_()
                pending = 0
                elapsed = state["train_time_s"] + time.perf_counter() - epoch_start
                avg = state["epoch_loss_sum"] / state["epoch_tokens"]
                bar.set_postfix(loss=f"{avg:.3f}", ppl=f"{math.exp(min(avg, 50)):.1f}", lr=f"{lr:.3g}",
                                tok_s=f"{state['epoch_tokens'] / max(elapsed, 1e-9):,.0f}")
        bar.close()
        state["epoch_loss_sum"] += loss_sum.item()
        state["train_time_s"] += time.perf_counter() - epoch_start
        finished_epoch = state["pos"] >= rows
        average = _end_of_epoch(cfg, run_dir, model, optimizer, corpus, valid_data, state, hidden,
                                finished_epoch, precision, average, clock)

    return _finish(cfg, run_dir, corpus, device, precision, state, clock)


def _probe_evaluation_time(model, valid_data, bptt, precision, clock, eval_tokens) -> None:
    """Time the evaluation of a few chunks of the validation split, so that a time budget
    keeps room for the final validation and test even before the first validation."""
    probe = valid_data[: 4 * bptt + 1]
    evaluate(model, probe[: bptt + 1], bptt, precision)  # the first call pays one-off set-up costs
    start = time.perf_counter()
    result = evaluate(model, probe, bptt, precision)
    clock.time_reserve(time.perf_counter() - start, result["tokens"], eval_tokens)


def _end_of_epoch(cfg, run_dir, model, optimizer, corpus, valid_data, state, hidden, finished_epoch,
                  precision, average, clock) -> WeightAverage | None:
    """Validate (the averaged weights once NT-ASGD has triggered), keep the best model,
    decay the learning rate on a plateau or trigger averaging, save the state."""
    t = cfg.train
    val_start = time.perf_counter()
    with average.swapped_in() if average is not None else contextlib.nullcontext():
        val = evaluate(model, valid_data, t.bptt, precision)
        train_loss = state["epoch_loss_sum"] / max(state["epoch_tokens"], 1)
        if not (math.isfinite(train_loss) and math.isfinite(val["loss"])):
            where = f"the last good checkpoint is in {run_dir}" if (run_dir / WEIGHTS).exists() else "nothing was saved"
            raise TrainingError(
                f"the loss is not finite (train {train_loss}, valid {val['loss']}) in epoch {state['epoch']} "
                f"by step {state['step']}; {where}. Lower the learning rate or set train.clip"
            )
        improved = state["best_val_loss"] is None or val["loss"] < state["best_val_loss"]
        if improved:
            state["best_val_loss"] = val["loss"]
            save_checkpoint(run_dir, model, corpus.tokenizer, cfg)
            update_latest(run_dir)
    # What the final validation and test will cost, kept free under a time budget.
    clock.time_reserve(time.perf_counter() - val_start, val["tokens"], val["tokens"] + len(corpus.splits["test"]))
    tok_s = state["epoch_tokens"] / max(state["train_time_s"], 1e-9)
    record = {
        "epoch": state["epoch"], "step": state["step"], "lr": state["last_lr"],
        "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 700)),
        "val_loss": val["loss"], "val_ppl": val["perplexity"], "val_top1": val["top1_accuracy"],
        "val_top5": val["top5_accuracy"], "averaged": average is not None,
        "tokens_per_s": tok_s, "epoch_time_s": state["train_time_s"], "elapsed_s": round(clock.elapsed(), 2),
        "complete_epoch": finished_epoch, "best": improved,
    }
    if finished_epoch:  # decide only at epoch ends, so that a stop-and-resume matches
        state["val_losses"].append(val["loss"])
        if t.nt_asgd and average is None and nt_asgd_triggers(state["val_losses"], t.nonmono):
            average = WeightAverage(model)
            state["averaging_since"] = state["step"]
            log(f"NT-ASGD: validation stopped improving; averaging the weights from step {state['step']} on")
        elif t.schedule == "plateau" and not improved and t.lr_decay > 1 and average is None:
            state["lr"] /= t.lr_decay  # validation got worse: anneal
        if t.schedule == "exponential" and state["epoch"] >= t.decay_start:
            state["lr"] /= t.lr_decay  # Zaremba et al. 2014: a fixed decay every epoch
    _append_metrics(run_dir, record)
    log(
        f"epoch {record['epoch']} | step {record['step']} | train ppl {record['train_ppl']:.6g} | "
        f"valid ppl {record['val_ppl']:.6g}{' (best)' if improved else ''}{' (averaged)' if record['averaged'] else ''} | "
        f"lr {record['lr']:.4g} | {tok_s:,.0f} tok/s | {state['train_time_s']:.1f} s"
        + (f" | {clock.elapsed() / 60:.1f} of {t.time_budget:g} min" if t.time_budget else "")
    )
    if finished_epoch:
        state.update(epoch=state["epoch"] + 1, batch=0, pos=0, epoch_loss_sum=0.0, epoch_tokens=0, train_time_s=0.0)
        hidden = None
    state["elapsed_s"] = clock.elapsed()
    extra = {}
    if average is not None:
        extra = {f"average.{i}": a for i, a in enumerate(average.averages)}
        extra["average.count"] = torch.tensor(average.count)
    save_training_state(run_dir, model, optimizer, state, hidden, extra)
    return average


def _finish(cfg, run_dir, corpus, device, precision, state, clock) -> dict[str, Any]:
    """Evaluate the best model on the test split and summarise the run."""
    from lstm_lm.checkpoint import load_checkpoint

    best, _, _ = load_checkpoint(run_dir, device)
    test_data = batchify(to_tensor(corpus.splits["test"], device), cfg.train.eval_batch_size)
    test = evaluate(best, test_data, cfg.train.bptt, precision) if test_data.size(0) > 1 else None
    best_val = state["best_val_loss"]
    summary = {
        "run_dir": str(run_dir),
        "epochs": state["epoch"] - 1 if state["pos"] == 0 else state["epoch"],
        "steps": state["step"],
        "best_valid_loss": best_val,
        "best_valid_perplexity": math.exp(min(best_val, 700)) if best_val is not None else None,
        "test_loss": test["loss"] if test else None,
        "test_perplexity": test["perplexity"] if test else None,
        "test_top1_accuracy": test["top1_accuracy"] if test else None,
        "test_top5_accuracy": test["top5_accuracy"] if test else None,
        "wall_s": round(clock.elapsed(), 2),
    }
    log(f"best model in {run_dir}: valid ppl {summary['best_valid_perplexity']:.6g}"
        + (f", test ppl {summary['test_perplexity']:.6g}" if test else ""))
    return summary


def run_training(
    config: str | Path | None, data: str | None, out: str | Path | None, resume: bool,
    overrides: list[str], started: float | None = None,
) -> dict[str, Any]:
    """What `lstm-lm train` does: build the config (or reload the run's own), then train."""
    from lstm_lm.config import DEMO_PRESET, load_config

    if data is not None:
        overrides = [f"data.source={data}"] + overrides
    if resume:
        if out is None:
            raise ConfigError(["--resume needs --out DIR, the run to continue"])
        if config is not None:
            raise ConfigError(["--resume continues the run's own config; change it with --set or options, not --config"])
        run_dir = Path(out)
        if not (run_dir / CONFIG).is_file() or not (run_dir / WEIGHTS).is_file():
            raise CheckpointError(f"cannot resume: {run_dir} holds no checkpoint (start it without --resume)")
        cfg, _ = load_config_json(run_dir)
        cfg = load_config(None, overrides, preset=cfg.to_dict())
        return train(cfg, run_dir, resume=True, started=started)
    preset = DEMO_PRESET if config is None and data is None else None
    cfg = load_config(config, overrides, preset=preset)
    if out is None:
        name = Path(config).stem if config is not None else ("demo" if cfg.data.source == "demo" else Path(cfg.data.source).stem)
        out = Path("runs") / name
    return train(cfg, out, started=started)
