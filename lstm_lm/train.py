"""Training: truncated BPTT with SGD (or AdamW), gradient clipping, a learning-rate
schedule (plateau decay, or warm-up and cosine), optional NT-ASGD weight averaging
and an optional wall-time budget.

    summary = train(load_config("configs/ptb-small.yaml"), out_dir="runs/ptb-small")

The run directory holds its checkpoints (see checkpoint.py: `best`, and
`checkpoints/step-N` with `checkpoints/last`, which `resume=True` continues from),
`metrics.jsonl` (one line per validation) and `steps.jsonl` (one line every
`log_interval` steps). Ctrl-C or SIGTERM stops the run after the current step with
a resumable checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lstm_lm import distributed, utils

from lstm_lm.checkpoint import (
    BEST, CHECKPOINTS, CONFIG, LAST, TOKENIZER, TRAINING_STATE, WEIGHTS, last_checkpoint, load_config_json,
    load_training_state, save_checkpoint, save_step_checkpoint, save_training_state, update_latest,
    write_atomically,
)
from lstm_lm.config import Config, TrainConfig
from lstm_lm.data import Corpus, batchify, get_batch, load_corpus, to_tensor
from lstm_lm.errors import CheckpointError, ConfigError, DataError, Interrupted, TrainingError
from lstm_lm.evaluate import evaluate
from lstm_lm.inspection import gradient_flow
from lstm_lm.model import LSTMLanguageModel, State, detach_state
from lstm_lm.runlock import RunInUseError, RunLock
from lstm_lm.optim import WeightAverage, make_optimizer, nt_asgd_triggers, scheduled_lr
from lstm_lm.utils import autocast, log, pick_device, pick_precision

METRICS, STEPS, GRAD_FLOW = "metrics.jsonl", "steps.jsonl", "grad_flow.jsonl"


def train_step(
    model: LSTMLanguageModel, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    hidden: State, clip: float, precision: str = "fp32", loss_fn: Callable | None = None,
    ar: float = 0.0, tar: float = 0.0, skip_nonfinite: bool = False,
) -> tuple[torch.Tensor | None, State]:
    """One step of truncated BPTT: forward, backward, clip, update. Returns the
    cross-entropy (on the device, without AR/TAR) and the new state.

    `loss_fn` replaces `model.training_loss` (with the same arguments), e.g. its compiled
    version. With `skip_nonfinite`, a step whose loss or gradient norm is not finite
    makes no update and returns (None, the state it was given); that check waits for
    the device.
    """
    # The memory (h, and c for an LSTM) carries on from the previous chunk, but the gradient stops here;
    # otherwise backward would run through the whole epoch.
    hidden_in = hidden = detach_state(hidden)
    with autocast(x.device, precision):  # bf16 matrix products; the loss stays float32
        objective, loss, hidden = (loss_fn or model.training_loss)(x, y, hidden, ar, tar)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip > 0 else None
    if skip_nonfinite:
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if not bool(torch.isfinite(objective) & torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            return None, hidden_in
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
        self.expired = False

    def time_reserve(self, seconds: float, tokens: int, eval_tokens: int) -> None:
        """Evaluating `tokens` took `seconds`: reserve enough for `eval_tokens`, with a margin."""
        self.reserve_s = 1.2 * seconds * eval_tokens / max(tokens, 1) + 1.0

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def progress(self) -> float:
        """Share of the training time used, 0 -> 1 (under a budget)."""
        return self.elapsed() / max(self.budget_s - self.reserve_s, 1e-9)

    def out_of_time(self) -> bool:
        """Whether the budget, less the reserve, is spent. Once it is, it stays spent: a
        later, smaller estimate of the reserve does not restart training."""
        if self.budget_s is not None and self.elapsed() + self.reserve_s >= self.budget_s:
            self.expired = True
        return self.expired


def train(cfg: Config, out_dir: str | Path, resume: bool = False, corpus: Corpus | None = None,
          started: float | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train (or with `resume`, continue) a run in `out_dir`; returns a summary of the run.

    `started` (a time.perf_counter() value, default now) is when the run's clock starts:
    the command line passes the moment the command began, before torch was imported.
    A directory that already holds a run is refused unless `resume` or `overwrite`.
    """
    run_dir = Path(out_dir)
    if not resume and not overwrite and _holds_a_run(run_dir):  # before any work
        raise CheckpointError(
            f"{run_dir} already holds a run; continue it with --resume, start it again with --overwrite "
            "(which deletes it), or choose another --out"
        )
    try:
        return Trainer(cfg, run_dir, corpus, started).run(resume)
    finally:
        distributed.teardown()


class StopSignals:
    """While active, a first SIGINT (Ctrl-C) or SIGTERM asks the run to stop after the
    current step and save; a second one quits at once (saved checkpoints stay whole)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        log(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
            "(press Ctrl-C again to quit at once)")


class Trainer:
    """One training run: its data, model, optimizer, state, clock and checkpoints."""

    def __init__(self, cfg: Config, run_dir: Path, corpus: Corpus | None = None, started: float | None = None):
        self.cfg, self.t, self.run_dir = cfg, cfg.train, run_dir
        t = self.t
        self.clock = Clock(t.time_budget, start=started)
        self.world = distributed.setup(t.device)  # a single process unless started by torchrun
        utils.QUIET = not self.world.main
        self.device = pick_device(distributed.device_for(self.world, t.device))
        torch.manual_seed(t.seed)

        self.corpus = corpus or load_corpus(cfg.data)
        if self.corpus.source.kind in ("dir", "file"):
            cfg.data.source = str(Path(cfg.data.source).expanduser().resolve())  # eval finds it from anywhere
        train_ids, valid_ids = self.corpus.splits["train"], self.corpus.splits["valid"]
        if len(train_ids) < t.batch_size * t.bptt + 1:
            raise DataError(
                f"the train split has {len(train_ids):,} tokens, fewer than one batch of batch_size x bptt "
                f"({t.batch_size} x {t.bptt}) + 1; use more text or a smaller --batch-size / --bptt"
            )
        if len(valid_ids) < t.eval_batch_size * 2:
            raise DataError(f"the valid split has {len(valid_ids)} tokens, too few for eval_batch_size {t.eval_batch_size}")
        # (T, B), kept on the device; in a distributed run this rank's streams only.
        self.train_data = batchify(to_tensor(train_ids, self.device), t.batch_size)[
            :, self.world.share(t.batch_size, "train.batch_size")]
        self.valid_data = batchify(to_tensor(valid_ids, self.device), t.eval_batch_size)[
            :, self.world.share(t.eval_batch_size, "train.eval_batch_size")]
        self.rows = self.train_data.size(0) - 1  # positions a chunk can start from
        self.n_batches = math.ceil(self.rows / t.bptt)  # per epoch (about that many with variable_bptt)

        self.model = LSTMLanguageModel(cfg.model, self.corpus.vocab_size).to(self.device)
        self.precision = pick_precision(t.precision, self.device)
        self.compiled_loss = compile_loss(self.model) if t.compile else None
        self.optimizer = make_optimizer(cfg, self.model)
        self.ddp: DistributedDataParallel | None = None
        if self.world.enabled:
            # DistributedDataParallel averages the gradients across ranks during backward.
            self.ddp = DistributedDataParallel(
                _TrainingLoss(self.model, self.compiled_loss),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
            torch.manual_seed(t.seed + self.world.rank)  # the same weights, but each rank its own dropout
        self.state: dict[str, Any] = {
            "epoch": 1, "batch": 0, "pos": 0, "step": 0, "lr": t.lr, "last_lr": t.lr, "best_val_loss": None,
            "epoch_loss_sum": 0.0, "epoch_tokens": 0, "train_time_s": 0.0, "elapsed_s": 0.0,
            "val_losses": [], "averaging_since": None, "skipped_steps": 0,
        }
        self.hidden: State | None = None
        self.average: WeightAverage | None = None
        self.stop = StopSignals()
        # Summed on the device between syncs (every log_interval steps), so steps do not wait.
        self.loss_sum = torch.zeros((), device=self.device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)  # a step number, or -1
        self.interval = {"tokens": 0, "loss": 0.0}  # since the last line of steps.jsonl
        self.segment_start = time.perf_counter()  # train_time_s counts from here
        self.last_save = time.perf_counter()
        self.saved: tuple[int, Path] | None = None  # (step, directory) of the last save
        self.compiled = False

    # -- the run ------------------------------------------------------------------------

    def run(self, resume: bool) -> dict[str, Any]:
        """Lock the run directory (rank 0 holds the lock for every rank), then train."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir) if self.world.main else None
        refused = None
        try:
            if lock is not None:
                lock.acquire()
        except RunInUseError as e:
            refused = e
        if self.world.any(refused is not None):
            raise refused or RunInUseError(f"{self.run_dir} is in use by another process")
        try:
            return self._run(resume)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, resume: bool) -> dict[str, Any]:
        t, state = self.t, self.state
        if resume:
            self._resume()
        else:
            self._start_afresh()
        self.clock.before = state["elapsed_s"]
        if resume and t.time_budget and self.clock.out_of_time():
            raise ConfigError([f"nothing to resume: {self.run_dir} already used its time budget of "
                               f"{t.time_budget:g} minutes; raise --time-budget"])
        log(
            f"model: {self.model.cell}, {self.model.num_parameters():,} parameters, impl {self.model.impl}, "
            f"vocab {self.corpus.vocab_size:,}, device {self.device}, precision {self.precision}"
            f"{', compiled' if t.compile else ''}; data: {len(self.corpus.splits['train']):,} train tokens, "
            f"{self.n_batches:,} batches of {t.batch_size}x{t.bptt} per epoch"
            + (f"; time budget {t.time_budget:g} min" if t.time_budget else "")
        )
        if t.time_budget:
            self._probe_evaluation_time()
        with self.stop:
            while state["epoch"] <= t.epochs and not self._should_stop():
                self._train_epoch()
                if self.stop.signum is not None:
                    break
                self._end_of_epoch(finished_epoch=state["pos"] >= self.rows)
            if self.stop.signum is not None:
                # An epoch's end may have saved this very step already.
                saved = self.saved[1] if self.saved and self.saved[0] == state["step"] else self._save(best=False)
                raise Interrupted(
                    f"stopped by {signal.Signals(self.stop.signum).name} at step {state['step']} "
                    f"(epoch {state['epoch']}); checkpoint saved in {saved}\n"
                    + (f"resume with: lstm-lm train --out {shlex.quote(str(self.run_dir))} --resume"
                       if not self.world.enabled else
                       f"resume with the same torchrun options and: -m lstm_lm train --out "
                       f"{shlex.quote(str(self.run_dir))} --resume"),
                    exit_code=128 + self.stop.signum,
                )
        return self._finish()

    def _start_afresh(self) -> None:
        """Delete what an earlier run left here (train() has checked that this is wanted):
        its logs, and where it saved any, its checkpoints."""
        names = [METRICS, STEPS, GRAD_FLOW]
        if _holds_a_run(self.run_dir):
            names += [CHECKPOINTS, BEST, *RUN_FILES_BEFORE_STEP_CHECKPOINTS]
        self.world.barrier()  # every rank has looked before rank 0 deletes
        for name in names if self.world.main else []:
            p = self.run_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    def _resume(self) -> None:
        t, state = self.t, self.state
        ckpt = last_checkpoint(self.run_dir)
        if ckpt is None:
            raise CheckpointError(f"cannot resume: {self.run_dir} holds no saved training state "
                                  "(start it without --resume)")
        saved, self.hidden, extra = load_training_state(ckpt, self.model, self.optimizer, self.device)
        if self.world.enabled:
            self._take_share(extra)
        saved.setdefault("pos", saved["batch"] * t.bptt)  # a state saved before variable_bptt existed
        state |= saved
        if (ckpt / CONFIG).is_file() and load_config_json(ckpt)[0].train.lr != t.lr:
            state["lr"] = t.lr  # --lr on a resume sets the rate from here on
            log(f"learning rate set to {t.lr:g} from here on")
        if state["averaging_since"] is not None:
            n = len(list(self.model.parameters()))
            self.average = WeightAverage(self.model, count=int(extra["average.count"].item()),
                                         averages=[extra[f"average.{i}"] for i in range(n)])
        if state["epoch"] > t.epochs or (t.max_steps is not None and state["step"] >= t.max_steps):
            raise ConfigError([
                f"nothing to resume: {self.run_dir} already ran {state['step']} steps into epoch {state['epoch']}; "
                "raise --epochs or --max-steps (or --set train.max_steps=null)"
            ])
        for name in (METRICS, STEPS, GRAD_FLOW) if self.world.main else ():  # lines after the checkpoint come again
            _truncate_log(self.run_dir / name, state["step"])
        log(f"resuming {self.run_dir} from {ckpt} at epoch {state['epoch']}, step {state['step']}")

    def _take_share(self, extra: dict[str, torch.Tensor]) -> None:
        """A distributed resume: this rank's streams of the saved state, and its own RNG."""
        if self.hidden is not None:
            rows = self.world.share(self.hidden[0][0].size(0), "the saved hidden state's batch")
            self.hidden = [tuple(t[rows] for t in layer) for layer in self.hidden]
        ranks = extra.get("rng.ranks")
        if ranks is not None and ranks.size(0) == self.world.size:
            torch.set_rng_state(ranks[self.world.rank].cpu().clone())  # a row of its own
            if self.device.type == "cuda" and "rng.cuda_ranks" in extra:
                torch.cuda.set_rng_state(extra["rng.cuda_ranks"][self.world.rank].cpu().clone())
        else:  # saved by a run with another number of processes: fresh dropout streams
            log(f"the checkpoint holds no RNG state for {self.world.size} processes; seeding each anew")
            torch.manual_seed(self.t.seed + self.state["step"] + self.world.rank)

    def _should_stop(self) -> bool:
        """Time to stop: steps, time or a signal. Every rank of a distributed run stops together."""
        t = self.t
        done = (t.max_steps is not None and self.state["step"] >= t.max_steps) or self.clock.out_of_time()
        if not self.world.enabled:
            return done or self.stop.signum is not None
        # One collective: a signal that reached any rank (its number) or any rank's "done".
        shared = self.world.max(((self.stop.signum or 0) << 1) | int(done))
        if shared >> 1:
            self.stop.signum = shared >> 1
        return shared > 0

    def _progress(self) -> float:
        """How far through the run: the schedule's clock."""
        if self.t.time_budget:
            return self.clock.progress()
        return self.state["step"] / (self.t.max_steps or self.t.epochs * self.n_batches)

    # -- training -----------------------------------------------------------------------

    def _train_epoch(self) -> None:
        t, state = self.t, self.state
        self.model.train()
        if self.hidden is None or state["pos"] == 0:
            self.hidden = self.model.init_state(self.train_data.size(1), self.device)  # this rank's streams
        self.segment_start = time.perf_counter()
        bar = tqdm(total=self.n_batches, initial=state["batch"], desc=f"epoch {state['epoch']}", unit="batch",
                   file=sys.stderr, disable=None if self.world.main else True, dynamic_ncols=True, leave=False)
        while state["pos"] < self.rows and not self._should_stop():
            self._step()
            bar.update(1)
            if state["step"] % t.log_interval == 0 or state["pos"] >= self.rows:  # the same steps after a resume
                self._log_interval(bar)
            if state["pos"] < self.rows and self._checkpoint_due():  # an epoch's end saves anyway
                self._save(best=False)
        bar.close()
        self._sync()

    def _step(self) -> None:
        t, state = self.t, self.state
        x, y = get_batch(self.train_data, state["pos"], chunk_length(t, state["step"]))
        lr = state["last_lr"] = scheduled_lr(t, state["lr"], state["step"], self._progress())
        # Variable-length chunks: a longer one carries more tokens, so it takes a longer step.
        for group in self.optimizer.param_groups:
            group["lr"] = lr * x.size(0) / t.bptt if t.variable_bptt else lr
        if t.log_grad_flow and (state["step"] + 1) % t.log_interval == 0 and self.world.main:
            self._append(GRAD_FLOW, {"step": state["step"] + 1, "cell": self.model.cell,
                                     "grad_norm": gradient_flow(self.model, x, y, self.hidden)})
        step_start = time.perf_counter()
        # A chunk of another length (the epoch's last) runs eagerly rather than compiling anew.
        loss_fn = self.compiled_loss if x.size(0) == t.bptt else None
        if self.ddp is not None:
            loss_fn = functools.partial(self.ddp, compiled=loss_fn is not None)
        loss, self.hidden = train_step(self.model, self.optimizer, x, y, self.hidden, t.clip, self.precision,
                                       loss_fn, t.ar, t.tar, skip_nonfinite=t.skip_nonfinite)
        state["step"] += 1
        state["batch"] += 1
        state["pos"] += x.size(0)
        if loss is None:  # skip_nonfinite: the update was skipped
            state["skipped_steps"] += 1
            log(f"step {state['step']}: the loss or gradient is not finite; update skipped "
                f"({state['skipped_steps']} so far)")
            return
        if self.average is not None:
            self.average.update()
        if not self.compiled and loss_fn is not None and t.compile:
            self.compiled = True
            loss.item()  # wait for the step, so the time is the compilation's
            log(f"compiled the model in {time.perf_counter() - step_start:.1f} s (first step included)")
        self.loss_sum += loss * y.numel()
        # Remember the first step whose loss is not finite, without a host sync.
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~torch.isfinite(loss),
                                           state["step"], self.first_nonfinite)
        tokens = y.numel() * self.world.size  # the global batch's: every rank runs the same shape
        state["epoch_tokens"] += tokens
        self.interval["tokens"] += tokens

    def _sync(self) -> None:
        """Fold what the device summed into the state (one host sync), stop on a non-finite
        loss, and count the training time so far."""
        (summed,) = self.world.sum([self.loss_sum.item()])  # the global batch's loss
        self.loss_sum.zero_()
        bad = self.world.max(int(self.first_nonfinite.item()))
        if bad >= 0:
            raise TrainingError(
                f"the loss is not a finite number at step {bad} (epoch {self.state['epoch']}); {self._last_good()}. "
                "Lower the learning rate, set train.clip, or set train.skip_nonfinite=true to skip such steps"
            )
        self.state["epoch_loss_sum"] += summed
        self.interval["loss"] += summed
        now = time.perf_counter()
        self.state["train_time_s"] += now - self.segment_start
        self.segment_start = now

    def _last_good(self) -> str:
        """Where a failed run can be continued from, for its error message."""
        last = last_checkpoint(self.run_dir)
        if last is None:
            return "nothing had been saved yet"
        return (f"the last good checkpoint is {last} (continue from it with: lstm-lm train --out "
                f"{shlex.quote(str(self.run_dir))} --resume --lr SMALLER)")

    def _log_interval(self, bar) -> None:
        """Progress bar and a line of steps.jsonl: the mean loss of the steps since the last."""
        state, interval = self.state, self.interval
        self._sync()
        if interval["tokens"]:
            loss = interval["loss"] / interval["tokens"]
            tok_s = state["epoch_tokens"] / max(state["train_time_s"], 1e-9)
            avg = state["epoch_loss_sum"] / max(state["epoch_tokens"], 1)
            bar.set_postfix(loss=f"{avg:.3f}", ppl=f"{math.exp(min(avg, 50)):.1f}", lr=f"{state['last_lr']:.3g}",
                            tok_s=f"{tok_s:,.0f}")
            self._append(STEPS, {
                "step": state["step"], "epoch": state["epoch"], "lr": state["last_lr"], "loss": loss,
                "tokens_per_s": tok_s, "elapsed_s": round(self.clock.elapsed(), 2),
            })
        self.interval = {"tokens": 0, "loss": 0.0}

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.world.main:
            _append_jsonl(self.run_dir / name, record)

    def _evaluate(self, data: torch.Tensor, model: LSTMLanguageModel | None = None) -> dict[str, float]:
        """`evaluate` on this rank's streams, summed over ranks: the whole split's result."""
        out = evaluate(model or self.model, data, self.t.bptt, self.precision)
        n = out["tokens"]
        loss, tokens, top1, top5 = self.world.sum(
            [out["loss"] * n, n, out["top1_accuracy"] * n, out["top5_accuracy"] * n])
        loss /= max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens),
                "top1_accuracy": top1 / max(tokens, 1), "top5_accuracy": top5 / max(tokens, 1)}

    def _checkpoint_due(self) -> bool:
        t = self.t
        if t.checkpoint_every is not None and self.state["step"] % t.checkpoint_every == 0:
            return True
        if t.checkpoint_minutes is None:
            return False
        return self.world.any(time.perf_counter() - self.last_save >= 60 * t.checkpoint_minutes)  # clocks differ

    # -- validation, checkpoints and the end --------------------------------------------

    def _eval_weights(self):
        """The weights to validate and save: the NT-ASGD average once it has started."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def _end_of_epoch(self, finished_epoch: bool) -> None:
        """Validate, decay the learning rate on a plateau or trigger averaging, save a
        checkpoint (the new best when validation improved)."""
        t, state = self.t, self.state
        val_start = time.perf_counter()
        with self._eval_weights():
            val = self._evaluate(self.valid_data)
        train_loss = state["epoch_loss_sum"] / max(state["epoch_tokens"], 1)
        if not math.isfinite(val["loss"]):
            raise TrainingError(
                f"the validation loss is not finite in epoch {state['epoch']} at step {state['step']}; "
                f"{self._last_good()}. "
                "Lower the learning rate or set train.clip"
            )
        improved = state["best_val_loss"] is None or val["loss"] < state["best_val_loss"]
        if improved:
            state["best_val_loss"] = val["loss"]
        # What the final validation and test will cost, kept free under a time budget.
        self.clock.time_reserve(time.perf_counter() - val_start, val["tokens"],
                                val["tokens"] + len(self.corpus.splits["test"]))
        tok_s = state["epoch_tokens"] / max(state["train_time_s"], 1e-9)
        record = {
            "epoch": state["epoch"], "step": state["step"], "lr": state["last_lr"],
            "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 700)),
            "val_loss": val["loss"], "val_ppl": val["perplexity"], "val_top1": val["top1_accuracy"],
            "val_top5": val["top5_accuracy"], "averaged": self.average is not None,
            "tokens_per_s": tok_s, "epoch_time_s": state["train_time_s"],
            "elapsed_s": round(self.clock.elapsed(), 2), "complete_epoch": finished_epoch, "best": improved,
            "skipped_steps": state["skipped_steps"],
        }
        if finished_epoch:  # decide only at epoch ends, so that a stop-and-resume matches
            state["val_losses"].append(val["loss"])
            if t.nt_asgd and self.average is None and nt_asgd_triggers(state["val_losses"], t.nonmono):
                self.average = WeightAverage(self.model)
                state["averaging_since"] = state["step"]
                log(f"NT-ASGD: validation stopped improving; averaging the weights from step {state['step']} on")
            elif t.schedule == "plateau" and not improved and t.lr_decay > 1 and self.average is None:
                state["lr"] /= t.lr_decay  # validation got worse: anneal
            if t.schedule == "exponential" and state["epoch"] >= t.decay_start:
                state["lr"] /= t.lr_decay  # Zaremba et al. 2014: a fixed decay every epoch
        self._append(METRICS, record)
        log(
            f"epoch {record['epoch']} | step {record['step']} | train ppl {record['train_ppl']:.6g} | "
            f"valid ppl {record['val_ppl']:.6g}{' (best)' if improved else ''}"
            f"{' (averaged)' if record['averaged'] else ''} | lr {record['lr']:.4g} | {tok_s:,.0f} tok/s | "
            f"{state['train_time_s']:.1f} s"
            + (f" | {self.clock.elapsed() / 60:.1f} of {t.time_budget:g} min" if t.time_budget else "")
        )
        if finished_epoch:
            state.update(epoch=state["epoch"] + 1, batch=0, pos=0, epoch_loss_sum=0.0, epoch_tokens=0,
                         train_time_s=0.0)
            self.hidden = None  # the next epoch starts from a zero state
        self._save(best=improved)

    def _save(self, best: bool) -> Path:
        """Write a step checkpoint: the weights to evaluate, and everything --resume needs."""
        state = self.state
        self._sync()
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not finite.item():
            raise TrainingError(f"the weights are not finite numbers at step {state['step']}; "
                                "not saving them over the last good checkpoint. Lower the learning rate")
        state["elapsed_s"] = self.clock.elapsed()
        extra = {}
        if self.average is not None:
            extra = {f"average.{i}": a for i, a in enumerate(self.average.averages)}
            extra["average.count"] = torch.tensor(self.average.count)
        hidden = self.hidden
        if self.world.enabled:  # the whole batch's state and every rank's RNG, gathered to all
            hidden = [tuple(self.world.gather(t) for t in layer) for layer in hidden] if hidden else None
            extra["rng.ranks"] = self.world.gather(torch.get_rng_state()[None])
            if self.device.type == "cuda":
                extra["rng.cuda_ranks"] = self.world.gather(torch.cuda.get_rng_state()[None])

        def fill(folder: Path) -> None:
            with self._eval_weights():
                save_checkpoint(folder, self.model, self.corpus.tokenizer, self.cfg)
            save_training_state(folder, self.model, self.optimizer, state, hidden, extra)

        saved = self.run_dir / CHECKPOINTS / LAST
        if self.world.main:  # rank 0 alone writes
            saved = save_step_checkpoint(self.run_dir, state["step"], fill, best, self.t.keep_last)
            update_latest(self.run_dir)
        self.world.barrier()  # no rank reads a checkpoint before it is whole
        self.last_save = time.perf_counter()
        self.saved = (state["step"], saved)
        return saved

    def _probe_evaluation_time(self) -> None:
        """Time the evaluation of a few chunks of the validation split, so that a time budget
        keeps room for the final validation and test even before the first validation."""
        bptt = self.t.bptt
        probe = self.valid_data[: 8 * bptt + 1]
        evaluate(self.model, probe[: bptt + 1], bptt, self.precision)  # the first call pays one-off costs
        timings = []
        for _ in range(3):  # the fastest of three: a busy moment of the machine says little
            start = time.perf_counter()
            result = evaluate(self.model, probe, bptt, self.precision)
            timings.append(time.perf_counter() - start)
        self.clock.time_reserve(min(timings), result["tokens"],
                                len(self.corpus.splits["valid"]) + len(self.corpus.splits["test"]))
        if self.clock.out_of_time():
            raise ConfigError([
                f"train.time_budget: {self.t.time_budget:g} minutes leave no time to train: "
                f"{self.clock.elapsed():.0f} s are gone and the final validation and test need about "
                f"{self.clock.reserve_s:.0f} s; raise --time-budget"
            ])

    def _finish(self) -> dict[str, Any]:
        """Evaluate the best model on the test split and summarise the run."""
        from lstm_lm.checkpoint import load_checkpoint, resolve_checkpoint

        state, t = self.state, self.t
        best_dir = resolve_checkpoint(self.run_dir)
        best, _, _ = load_checkpoint(best_dir, self.device)
        test_data = batchify(to_tensor(self.corpus.splits["test"], self.device), t.eval_batch_size)
        test_data = test_data[:, self.world.share(t.eval_batch_size, "train.eval_batch_size")]
        test = None
        if test_data.size(0) > 1:
            test = self._evaluate(test_data, best)
        best_val = state["best_val_loss"]
        summary = {
            "run_dir": str(self.run_dir),
            "best_checkpoint": str(best_dir),
            "epochs": state["epoch"] - 1 if state["pos"] == 0 else state["epoch"],
            "steps": state["step"],
            "skipped_steps": state["skipped_steps"],
            "best_valid_loss": best_val,
            "best_valid_perplexity": math.exp(min(best_val, 700)) if best_val is not None else None,
            "test_loss": test["loss"] if test else None,
            "test_perplexity": test["perplexity"] if test else None,
            "test_top1_accuracy": test["top1_accuracy"] if test else None,
            "test_top5_accuracy": test["top5_accuracy"] if test else None,
            "wall_s": round(self.clock.elapsed(), 2),
        }
        log(f"best model in {best_dir}: valid ppl {summary['best_valid_perplexity']:.6g}"
            + (f", test ppl {summary['test_perplexity']:.6g}" if test else ""))
        return summary


class _TrainingLoss(torch.nn.Module):
    """`model.training_loss` (or its compiled version) as a module's forward, so that
    DistributedDataParallel, which hooks a module's forward, can wrap it."""

    def __init__(self, model: LSTMLanguageModel, compiled: Callable | None):
        super().__init__()
        self.model = model
        self.compiled = compiled

    def forward(self, x, y, hidden, ar=0.0, tar=0.0, compiled=False):
        return (self.compiled if compiled and self.compiled is not None else self.model.training_loss)(
            x, y, hidden, ar, tar)


# A run directory written before checkpoints were step directories was itself the checkpoint.
RUN_FILES_BEFORE_STEP_CHECKPOINTS = (CONFIG, WEIGHTS, TOKENIZER, TRAINING_STATE)


def _holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() or (run_dir / name).is_symlink()
               for name in (CHECKPOINTS, BEST, WEIGHTS, TRAINING_STATE))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of a .jsonl log up to `step` (and drop a half-written last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    write_atomically(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))


def run_training(
    config: str | Path | None, data: str | None, out: str | Path | None, resume: bool,
    overrides: list[str], started: float | None = None, overwrite: bool = False,
    values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `lstm-lm train` does: build the config (or reload the run's own), then train.

    `overrides` are "section.key=value" strings (--set), `values` typed values by key
    (the command's own options); both win over the recipe, `values` last.
    """
    from lstm_lm.config import demo_config, load_config

    values = dict(values or {})
    if data is not None:
        values = {"data.source": str(data)} | values
    if resume:
        if out is None:
            raise ConfigError(["--resume needs --out DIR, the run to continue"])
        if config is not None:
            raise ConfigError(["--resume continues the run's own config; change it with --set or options, not --config"])
        run_dir = Path(out)
        ckpt = last_checkpoint(run_dir)
        if ckpt is None or not (ckpt / CONFIG).is_file():
            raise CheckpointError(f"cannot resume: {run_dir} holds no saved run (start it without --resume)")
        cfg, _ = load_config_json(ckpt)
        cfg = load_config(None, overrides, preset=cfg.to_dict(), values=values)
        return train(cfg, run_dir, resume=True, started=started)
    if config is None and data is None:
        cfg = demo_config(overrides, values)
    else:
        cfg = load_config(config, overrides, values=values)
    if out is None:
        name = Path(config).stem if config is not None else ("demo" if cfg.data.source == "demo" else Path(cfg.data.source).stem)
        out = Path("runs") / name
    return train(cfg, out, started=started, overwrite=overwrite)
