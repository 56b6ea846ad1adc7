"""Training: truncated BPTT with SGD (or AdamW), gradient clipping and the classic
"divide the learning rate when validation stops improving" schedule.

    summary = train(load_config("configs/ptb-small.yaml"), out_dir="runs/ptb-small")

The run directory is a checkpoint (see checkpoint.py) holding the best model by
validation loss, plus `metrics.jsonl` (one line per epoch) and the training state
that `resume=True` continues from.
"""

from __future__ import annotations

import json
import math
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
from lstm_lm.config import Config
from lstm_lm.data import Corpus, batchify, get_batch, load_corpus, to_tensor
from lstm_lm.errors import CheckpointError, ConfigError, DataError, TrainingError
from lstm_lm.evaluate import evaluate
from lstm_lm.model import LSTMLanguageModel, State
from lstm_lm.utils import autocast, log, pick_device, pick_precision

METRICS = "metrics.jsonl"


def train_step(
    model: LSTMLanguageModel, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    hidden: State, clip: float, precision: str = "fp32", loss_fn: Callable | None = None,
) -> tuple[torch.Tensor, State]:
    """One step of truncated BPTT: forward, backward, clip, update. Returns the loss (on the device) and (h, c).

    `loss_fn` replaces `model.loss` (with the same arguments), e.g. its compiled version.
    """
    # The memory (h, c) carries on from the previous chunk, but the gradient stops here;
    # otherwise backward would run through the whole epoch.
    hidden = tuple(h.detach() for h in hidden)
    with autocast(x.device, precision):  # bf16 matrix products; the loss stays float32
        loss, hidden = (loss_fn or model.loss)(x, y, hidden)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.detach(), hidden


def compile_loss(model: LSTMLanguageModel) -> Callable:
    """`model.loss` compiled with torch.compile: embedding, dropout, the LSTM and the
    fused output layer + loss, forward and backward. With the hand-written cell that is
    one graph, its whole time loop included; nn.LSTM cannot be traced, so the graph
    breaks around it. Inductor fuses the element-wise work (the gates, the dropout
    masks, the softmax), which is where a CPU spends the time matrix products do not.

    Compilation happens on the first call and again for each new input shape; the
    model itself is unchanged, so checkpoints are the same.
    """
    return torch.compile(model.loss, dynamic=False)


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: Config, out_dir: str | Path, resume: bool = False, corpus: Corpus | None = None) -> dict[str, Any]:
    """Train (or with `resume`, continue) a run in `out_dir`; returns a summary of the run."""
    run_dir = Path(out_dir)
    t, started = cfg.train, time.perf_counter()
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
    n_batches = math.ceil((train_data.size(0) - 1) / t.bptt)

    model = LSTMLanguageModel(cfg.model, corpus.vocab_size).to(device)
    precision = pick_precision(t.precision, device)
    compiled_loss = compile_loss(model) if t.compile else None
    first_step = True
    optimizer = make_optimizer(cfg, model)
    state: dict[str, Any] = {
        "epoch": 1, "batch": 0, "step": 0, "lr": t.lr, "best_val_loss": None,
        "epoch_loss_sum": 0.0, "epoch_tokens": 0, "train_time_s": 0.0,
    }
    hidden = None
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        state, hidden = load_training_state(run_dir, model, optimizer, device)
        if state["epoch"] > t.epochs or (t.max_steps is not None and state["step"] >= t.max_steps):
            raise ConfigError([
                f"nothing to resume: {run_dir} already ran {state['step']} steps into epoch {state['epoch']}; "
                "raise --epochs or --max-steps (or --set train.max_steps=null)"
            ])
        log(f"resuming {run_dir} at epoch {state['epoch']}, step {state['step']}")
    else:
        (run_dir / METRICS).unlink(missing_ok=True)
        (run_dir / TRAINING_STATE).unlink(missing_ok=True)
    for group in optimizer.param_groups:
        group["lr"] = state["lr"]
    log(
        f"model: {model.num_parameters():,} parameters, impl {model.impl}, vocab {corpus.vocab_size:,}, "
        f"device {device}, precision {precision}{', compiled' if t.compile else ''}; "
        f"data: {len(train_ids):,} train tokens, {n_batches:,} batches of {t.batch_size}x{t.bptt} per epoch"
    )

    def out_of_steps() -> bool:
        return t.max_steps is not None and state["step"] >= t.max_steps

    while state["epoch"] <= t.epochs and not out_of_steps():
        model.train()
        if hidden is None or state["batch"] == 0:
            hidden = model.init_state(t.batch_size, device)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        pending = 0
        bar = tqdm(total=n_batches, initial=state["batch"], desc=f"epoch {state['epoch']}", unit="batch",
                   file=sys.stderr, disable=None, dynamic_ncols=True, leave=False)
        while state["batch"] < n_batches and not out_of_steps():
            x, y = get_batch(train_data, state["batch"] * t.bptt, t.bptt)
            step_start = time.perf_counter()
            # The epoch's last chunk is shorter: it runs eagerly rather than compiling anew.
            loss_fn = compiled_loss if x.size(0) == t.bptt else None
            loss, hidden = train_step(model, optimizer, x, y, hidden, t.clip, precision, loss_fn)
            if first_step and loss_fn is not None:
                first_step = False
                loss.item()  # wait for the step, so the time is the compilation's
                log(f"compiled the model in {time.perf_counter() - step_start:.1f} s (first step included)")
            loss_sum += loss * y.numel()
            state["epoch_tokens"] += y.numel()
            state["step"] += 1
            state["batch"] += 1
            pending += 1
            bar.update(1)
            if pending == t.log_interval or state["batch"] == n_batches:
                state["epoch_loss_sum"] += loss_sum.item()  # the one sync every log_interval steps
                loss_sum.zero_()
                pending = 0
                elapsed = state["train_time_s"] + time.perf_counter() - epoch_start
                avg = state["epoch_loss_sum"] / state["epoch_tokens"]
                bar.set_postfix(loss=f"{avg:.3f}", ppl=f"{math.exp(min(avg, 50)):.1f}", lr=f"{state['lr']:.3g}",
                                tok_s=f"{state['epoch_tokens'] / max(elapsed, 1e-9):,.0f}")
        bar.close()
        state["epoch_loss_sum"] += loss_sum.item()
        state["train_time_s"] += time.perf_counter() - epoch_start
        finished_epoch = state["batch"] >= n_batches
        _end_of_epoch(cfg, run_dir, model, optimizer, corpus, valid_data, state, hidden, finished_epoch, precision)

    return _finish(cfg, run_dir, corpus, device, precision, state, started)


def _end_of_epoch(cfg, run_dir, model, optimizer, corpus, valid_data, state, hidden, finished_epoch, precision) -> None:
    """Validate, keep the best model, decay the learning rate on a plateau, save the state."""
    t = cfg.train
    val = evaluate(model, valid_data, t.bptt, precision)
    train_loss = state["epoch_loss_sum"] / max(state["epoch_tokens"], 1)
    if not (math.isfinite(train_loss) and math.isfinite(val["loss"])):
        where = f"the last good checkpoint is in {run_dir}" if (run_dir / WEIGHTS).exists() else "nothing was saved"
        raise TrainingError(
            f"the loss is not finite (train {train_loss}, valid {val['loss']}) in epoch {state['epoch']} "
            f"by step {state['step']}; {where}. Lower the learning rate or set train.clip"
        )
    tok_s = state["epoch_tokens"] / max(state["train_time_s"], 1e-9)
    record = {
        "epoch": state["epoch"], "step": state["step"], "lr": state["lr"],
        "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 700)),
        "val_loss": val["loss"], "val_ppl": val["perplexity"],
        "tokens_per_s": tok_s, "epoch_time_s": state["train_time_s"], "complete_epoch": finished_epoch,
    }
    improved = state["best_val_loss"] is None or val["loss"] < state["best_val_loss"]
    if improved:
        state["best_val_loss"] = val["loss"]
        save_checkpoint(run_dir, model, corpus.tokenizer, cfg)
        update_latest(run_dir)
    elif t.lr_decay > 1 and finished_epoch:  # decide only at epoch ends, so a stop-and-resume matches
        state["lr"] /= t.lr_decay  # validation got worse: anneal (Zaremba et al. 2014 style)
        for group in optimizer.param_groups:
            group["lr"] = state["lr"]
    record["best"] = improved
    _append_metrics(run_dir, record)
    log(
        f"epoch {record['epoch']} | step {record['step']} | train ppl {record['train_ppl']:.6g} | "
        f"valid ppl {record['val_ppl']:.6g}{' (best)' if improved else ''} | lr {record['lr']:.4g} | "
        f"{tok_s:,.0f} tok/s | {state['train_time_s']:.1f} s"
    )
    if finished_epoch:
        state.update(epoch=state["epoch"] + 1, batch=0, epoch_loss_sum=0.0, epoch_tokens=0, train_time_s=0.0)
        hidden = None
    save_training_state(run_dir, model, optimizer, state, hidden)


def _finish(cfg, run_dir, corpus, device, precision, state, started) -> dict[str, Any]:
    """Evaluate the best model on the test split and summarise the run."""
    from lstm_lm.checkpoint import load_checkpoint

    best, _, _ = load_checkpoint(run_dir, device)
    test_data = batchify(to_tensor(corpus.splits["test"], device), cfg.train.eval_batch_size)
    test = evaluate(best, test_data, cfg.train.bptt, precision) if test_data.size(0) > 1 else None
    best_val = state["best_val_loss"]
    summary = {
        "run_dir": str(run_dir),
        "epochs": state["epoch"] - 1 if state["batch"] == 0 else state["epoch"],
        "steps": state["step"],
        "best_valid_loss": best_val,
        "best_valid_perplexity": math.exp(min(best_val, 700)) if best_val is not None else None,
        "test_loss": test["loss"] if test else None,
        "test_perplexity": test["perplexity"] if test else None,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    log(f"best model in {run_dir}: valid ppl {summary['best_valid_perplexity']:.6g}"
        + (f", test ppl {summary['test_perplexity']:.6g}" if test else ""))
    return summary


def run_training(
    config: str | Path | None, data: str | None, out: str | Path | None, resume: bool,
    overrides: list[str],
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
        return train(cfg, run_dir, resume=True)
    preset = DEMO_PRESET if config is None and data is None else None
    cfg = load_config(config, overrides, preset=preset)
    if out is None:
        name = Path(config).stem if config is not None else ("demo" if cfg.data.source == "demo" else Path(cfg.data.source).stem)
        out = Path("runs") / name
    return train(cfg, out)
