"""The training loop: truncated BPTT with SGD (or AdamW), gradient clipping, the
learning-rate policy, optional NT-ASGD weight averaging, validation and checkpoints.

    trainer = Trainer(cfg, run_dir, world, clock, RunLog(run_dir))
    trainer.checkpoints.resume()   # or start afresh
    summary = trainer.fit()

train.py sets a run up (its directory, its lock, the process group) around this.
One step, from batch to update, is `Trainer._train_epoch`'s loop body.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lstm_lm.adaptive import check_cutoffs, default_cutoffs
from lstm_lm.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from lstm_lm.config import Config, TrainConfig
from lstm_lm.data import Corpus, Streams, get_batch, load_corpus
from lstm_lm.errors import CheckpointError, ConfigError, DataError, Interrupted, TrainingError
from lstm_lm.evaluation.evaluate import evaluate
from lstm_lm.inference.inspection import gradient_flow
from lstm_lm.loss import resolve_loss_impl
from lstm_lm.model import LSTMLanguageModel, State, detach_state
from lstm_lm.training import distributed
from lstm_lm.training.clock import Clock
from lstm_lm.training.distributed import World
from lstm_lm.training.optim import LearningRate, WeightAverage, make_optimizer, nt_asgd_triggers
from lstm_lm.training.rundir import CHECKPOINTS, LAST, last_checkpoint, resume_hint, save_step_checkpoint, update_latest
from lstm_lm.training.runlogs import GRAD_FLOW, METRICS, STEPS, RunLog
from lstm_lm.training.signals import StopSignals
from lstm_lm.training.training_state import (
    TrainState,
    load_training_state,
    restore_average,
    resume_tensors,
    save_training_state,
    take_share,
)
from lstm_lm.utils import NOT_COMPILED, autocast, log, pick_device, pick_precision


def train_step(
    model: LSTMLanguageModel,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: State,
    clip: float,
    precision: str = "fp32",
    loss_fn: Callable | None = None,
    ar: float = 0.0,
    tar: float = 0.0,
    skip_nonfinite: bool = False,
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


def compile_loss(model: LSTMLanguageModel, mode: str = "default") -> Callable:
    """`model.training_loss` compiled with torch.compile: embedding, dropout, the LSTM
    and the fused output layer + loss, forward and backward. With the hand-written
    cell that is one graph, its whole time loop included; the fused nn.LSTM kernel is
    called as an opaque op inside it. Inductor fuses the element-wise work (the gates,
    the dropout masks, the softmax), which is where a CPU spends the time matrix
    products do not.

    Compilation happens on the first call and again for each new input shape; the
    model itself is unchanged, so checkpoints are the same. `mode` is torch.compile's
    (reduce-overhead: CUDA graphs on a GPU).
    """
    for fn in NOT_COMPILED:  # made now, or the first trace would stop at each to make it
        fn.disabled()
    return torch.compile(model.training_loss, dynamic=False, mode=mode)


def chunk_length(t: TrainConfig, step: int) -> int:
    """Time steps of the chunk at optimizer step `step`: bptt, or with variable_bptt a
    length drawn as AWD-LSTM does. Drawn from (seed, step) alone, so a resumed run
    draws the same lengths."""
    if not t.variable_bptt:
        return t.bptt
    rng = random.Random(t.seed * 1_000_003 + step)
    mean = t.bptt if rng.random() < 0.95 else t.bptt / 2
    return max(5, int(rng.gauss(mean, 5)))


def training_streams(corpus: Corpus, t: TrainConfig, world: World, device: torch.device):
    """The train and valid splits as (T, B) streams on the device: this rank's share of them."""
    train_ids, valid_ids = corpus.splits["train"], corpus.splits["valid"]
    if len(train_ids) < t.batch_size * t.bptt + 1:
        raise DataError(
            f"the train split has {len(train_ids):,} tokens, fewer than one batch of batch_size x bptt "
            f"({t.batch_size} x {t.bptt}) + 1; use more text or a smaller --batch-size / --bptt"
        )
    if len(valid_ids) < t.eval_batch_size * 2:
        raise DataError(f"the valid split has {len(valid_ids)} tokens, too few for eval_batch_size {t.eval_batch_size}")
    train = Streams(train_ids, t.batch_size, device)[:, world.share(t.batch_size, "train.batch_size")]
    valid = Streams(valid_ids, t.eval_batch_size, device)[:, world.share(t.eval_batch_size, "train.eval_batch_size")]
    return train, valid


class LossMeter:
    """The training loss, summed on the device between host syncs (every log_interval
    steps) so that steps never wait for it; and the tokens since the last log line."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), device=device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)  # a step number, or -1
        self.tokens, self.loss = 0, 0.0  # since the last line of steps.jsonl (global batch)

    def add(self, loss: torch.Tensor, tokens: int, step: int) -> None:
        """`loss`, the mean over this rank's `tokens`, at step `step`; noting without a
        host sync the first step whose loss is not finite."""
        self.sum += loss * tokens
        self.first_nonfinite = torch.where(
            (self.first_nonfinite < 0) & ~torch.isfinite(loss), step, self.first_nonfinite
        )

    def collect(self, world: World) -> tuple[float, int]:
        """(the summed loss of every rank since the last call, the first non-finite step or -1)."""
        (summed,) = world.sum([self.sum.item()])
        self.sum.zero_()
        self.loss += summed
        return summed, world.max(int(self.first_nonfinite.item()))


class Trainer:
    """One training run: its data, model, optimizer, learning rate, state and checkpoints."""

    def __init__(
        self, cfg: Config, run_dir: Path, world: World, clock: Clock, logs: RunLog, corpus: Corpus | None = None
    ):
        t = cfg.train
        self.device = pick_device(distributed.device_for(world, t.device))
        torch.manual_seed(t.seed)
        self.corpus = corpus or load_corpus(cfg.data)
        if self.corpus.source.kind in ("dir", "file"):  # saved with its absolute path: eval finds it from anywhere
            source = str(Path(cfg.data.source).expanduser().resolve())
            cfg = dataclasses.replace(
                cfg, data=dataclasses.replace(cfg.data, source=source)
            )  # a copy: cfg is the caller's
        self.cfg, self.t, self.run_dir, self.world, self.clock, self.logs = cfg, t, run_dir, world, clock, logs
        self.train_data, self.valid_data = training_streams(self.corpus, t, world, self.device)
        self.rows = self.train_data.size(0) - 1  # positions a chunk can start from
        self.n_batches = math.ceil(self.rows / t.bptt)  # per epoch (about that many with variable_bptt)

        m = cfg.model
        if m.softmax == "adaptive" and (
            problem := check_cutoffs(m.cutoffs or default_cutoffs(self.corpus.vocab_size), self.corpus.vocab_size)
        ):
            raise ConfigError([problem])
        loss_impl = resolve_loss_impl(t.loss_impl, self.device)
        self.model = LSTMLanguageModel(m, self.corpus.vocab_size, loss_impl=loss_impl).to(self.device)
        self.precision = pick_precision(t.precision, self.device)
        self.loss = _TrainingLoss(self.model, t.compile, t.compile_mode)
        self.optimizer = make_optimizer(cfg, self.model)
        self.ddp = None
        if world.enabled:  # DistributedDataParallel averages the gradients across ranks during backward
            self.ddp = DistributedDataParallel(
                self.loss, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            torch.manual_seed(t.seed + world.rank)  # the same weights, but each rank its own dropout
        self.lr = LearningRate(t, clock, t.epochs * self.n_batches)
        self.state = TrainState.start(t.lr)
        self.hidden: State | None = None
        self.average: WeightAverage | None = None  # NT-ASGD's, once it has begun
        self.meter = LossMeter(self.device)
        self.stop = StopSignals()
        self.segment_start = time.perf_counter()
        self.checkpoints = Checkpoints(self)
        self.compile_logged = False  # the first compiled step's time, logged once
        self.validated_at: int | None = None  # the step of the last validation
        self.diverged = False  # the last validation said so, and train.stop_diverged ends the run

    def fit(self) -> dict[str, Any]:
        """Train until the epochs, max_steps or the time budget run out, or a signal
        stops the run; then test the best checkpoint and summarise the run."""
        t, s = self.t, self.state
        log(_describe(self.model, self.corpus, t, self.device, self.precision, self.n_batches))
        if t.time_budget:  # keep room for the final validation and test even before the first validation
            reserve_evaluation_time(
                self.clock,
                self.model,
                self.valid_data,
                t,
                self.precision,
                len(self.corpus.splits["valid"]) + len(self.corpus.splits["test"]),
            )
        with self.stop:
            while s.epoch <= t.epochs and not (self.diverged or self._should_stop() or self.lr.spent(s)):
                self._train_epoch()
                if self.stop.signum is not None:
                    break
                if s.pos >= self.rows or self.validated_at != s.step:  # (eval_every may have just validated)
                    self._end_of_epoch(whole=s.pos >= self.rows)
            if self.stop.signum is not None:
                # An epoch's end may have saved this very step already.
                last = self.checkpoints.saved
                saved = last[1] if last and last[0] == s.step else self.checkpoints.save(best=False)
                raise Interrupted(
                    _interrupted(self.stop.name, s, saved, self.run_dir, self.world), exit_code=128 + self.stop.signum
                )
        return self.checkpoints.finish(end_reason(self))

    # -- training -----------------------------------------------------------------------

    def _train_epoch(self) -> None:
        """Train on the rest of this epoch's chunks, one truncated-BPTT step each."""
        t, s = self.t, self.state
        self.model.train()
        if self.hidden is None or s.pos == 0:
            self.hidden = self.model.init_state(self.train_data.size(1), self.device)  # this rank's streams
        self.segment_start = time.perf_counter()
        self.logged_time = s.epoch_time_s if s.pos else 0.0  # the epoch's training time at the last steps.jsonl line
        bar = tqdm(
            total=self.n_batches,
            initial=s.batch,
            desc=f"epoch {s.epoch}",
            unit="batch",
            file=sys.stderr,
            disable=None if self.world.main else True,
            dynamic_ncols=True,
            leave=False,
        )
        while s.pos < self.rows and not self._should_stop():
            x, y = get_batch(self.train_data, s.pos, chunk_length(t, s.step))
            self.lr.set(s, self.optimizer, x.size(0))
            if t.log_grad_flow and (s.step + 1) % t.log_interval == 0 and self.world.main:
                self.logs.write(
                    GRAD_FLOW,
                    {
                        "step": s.step + 1,
                        "cell": self.model.cell,
                        "grad_norm": gradient_flow(self.model, x, y, self.hidden),
                    },
                )
            self._step(x, y)
            bar.update(1)
            if s.step % t.log_interval == 0 or s.pos >= self.rows:  # the same steps after a resume
                self._log_steps(bar)
            if s.pos < self.rows and t.eval_every and s.step % t.eval_every == 0:
                self.sync()
                self._end_of_epoch(whole=False)  # validate and save inside the epoch
                self.model.train()
            elif s.pos < self.rows and self.checkpoints.due():  # an epoch's end saves anyway
                self.checkpoints.save(best=False)
        bar.close()
        self.sync()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the chunk (x, y), counted in the state and the loss meter."""
        t, s = self.t, self.state
        started = time.perf_counter()
        loss_fn = self.loss.for_chunk(x.size(0), t.bptt, self.ddp)
        loss, self.hidden = train_step(
            self.model,
            self.optimizer,
            x,
            y,
            self.hidden,
            t.clip,
            self.precision,
            loss_fn,
            t.ar,
            t.tar,
            t.skip_nonfinite,
        )
        s.step, s.batch, s.pos = s.step + 1, s.batch + 1, s.pos + x.size(0)
        if loss is None:  # skip_nonfinite: the update was skipped
            s.skipped_steps += 1
            log(f"step {s.step}: the loss or gradient is not finite; update skipped ({s.skipped_steps} so far)")
        else:
            if self.average is not None:
                self.average.update()
            if t.compile and not self.compile_logged and x.size(0) == t.bptt:
                self.compile_logged = True
                loss.item()  # wait for the step, so the time is the compilation's
                log(f"compiled the model in {time.perf_counter() - started:.1f} s (first step included)")
            self.meter.add(loss, y.numel(), s.step)
            tokens = y.numel() * self.world.size  # the global batch's: every rank runs the same shape
            s.epoch_tokens += tokens
            self.meter.tokens += tokens

    def sync(self) -> None:
        """Fold the device's loss sum into the state (one host sync), stop on a non-finite
        loss, and count the training time so far."""
        summed, bad = self.meter.collect(self.world)
        if bad >= 0:
            raise TrainingError(
                f"the loss is not a finite number at step {bad} (epoch {self.state.epoch}); "
                f"{resume_hint(self.run_dir)}. "
                "Lower the learning rate, set train.clip, or set train.skip_nonfinite=true to skip such steps"
            )
        self.state.epoch_loss_sum += summed
        now = time.perf_counter()
        self.state.epoch_time_s += now - self.segment_start
        self.segment_start = now

    def _log_steps(self, bar) -> None:
        """Progress bar and a line of steps.jsonl (see `steps_record`)."""
        self.sync()
        if self.meter.tokens:
            record = steps_record(self.state, self.meter, self.state.epoch_time_s - self.logged_time, self.clock)
            self.logged_time = self.state.epoch_time_s
            avg = self.state.epoch_loss_sum / max(self.state.epoch_tokens, 1)
            ppl, lr, tok_s = f"{math.exp(min(avg, 50)):.1f}", f"{self.state.lr:.3g}", f"{record['tokens_per_s']:,.0f}"
            bar.set_postfix(loss=f"{avg:.3f}", ppl=ppl, lr=lr, tok_s=tok_s)
            self.logs.write(STEPS, record)
        self.meter.tokens, self.meter.loss = 0, 0.0

    def _should_stop(self) -> bool:
        """Time to stop: steps, time or a signal. Every rank of a distributed run stops together."""
        t = self.t
        done = steps_done(t, self.state) or self.clock.out_of_time()
        if not self.world.enabled:
            return done or self.stop.signum is not None
        # One collective: a signal that reached any rank (its number) or any rank's "done".
        shared = self.world.max(((self.stop.signum or 0) << 1) | int(done))
        if shared >> 1:
            self.stop.signum = shared >> 1
        return shared > 0

    # -- validation, checkpoints and the end --------------------------------------------

    def eval_weights(self):
        """The weights to validate and save: the NT-ASGD average once it has begun."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def _end_of_epoch(self, whole: bool) -> None:
        """Validate; at a whole epoch's end, begin NT-ASGD averaging or move the learning
        rate; log; save a checkpoint (the new best when validation improved)."""
        t, s = self.t, self.state
        started = time.perf_counter()
        with self.eval_weights():
            val = evaluate_streams(self.model, self.valid_data, t.bptt, self.precision, self.world)
        if not math.isfinite(val["loss"]):
            raise TrainingError(
                f"the validation loss is not finite in epoch {s.epoch} at step {s.step}; "
                f"{resume_hint(self.run_dir)}. Lower the learning rate or set train.clip"
            )
        self.validated_at = s.step
        improved = s.best_val_loss is None or val["loss"] < s.best_val_loss
        if improved:
            s.best_val_loss = val["loss"]
        # What the final validation and test will cost, kept free under a time budget.
        self.clock.time_reserve(
            time.perf_counter() - started, val["tokens"], val["tokens"] + len(self.corpus.splits["test"])
        )
        record = _metrics_record(s, val, improved, whole, self.average is not None, self.clock)
        if whole:  # decide only at epoch ends, so that a stop-and-resume matches
            s.val_losses.append(val["loss"])
            if t.nt_asgd and self.average is None and nt_asgd_triggers(s.val_losses, t.nonmono):
                self.average, s.averaging_since = WeightAverage(self.model), s.step
                log(f"NT-ASGD: validation stopped improving; averaging the weights from step {s.step} on")
            self.lr.after_epoch(s, improved, averaging=self.average is not None)
        self.logs.write(METRICS, record)
        log(
            f"epoch {s.epoch} | step {s.step} | train ppl {record['train_ppl']:.6g} | "
            f"valid ppl {record['val_ppl']:.6g}{' (best)' if improved else ''}"
            f"{' (averaged)' if record['averaged'] else ''} | lr {record['lr']:.4g} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {s.epoch_time_s:.1f} s"
            + (f" | {self.clock.elapsed() / 60:.1f} of {t.time_budget:g} min" if t.time_budget else "")
        )
        self.diverged = check_divergence(val["perplexity"], self.corpus.vocab_size, stop=t.stop_diverged and whole)
        if whole:
            s.next_epoch()
            self.hidden = None  # the next epoch starts from a zero state
        self.segment_start = time.perf_counter()  # the validation is no epoch's training time
        self.checkpoints.save(
            best=improved, measured={"step": s.step, "valid_loss": val["loss"], "valid_perplexity": val["perplexity"]}
        )


class Checkpoints:
    """A run's step checkpoints: when one is due, writing one (everything --resume needs),
    and at the end, the best one tested."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.last_save = time.perf_counter()
        self.saved: tuple[int, Path] | None = None  # (step, directory) of the last save

    def resume(self) -> None:
        """Continue from the run's last checkpoint: its weights, optimizer, RNG, hidden state and TrainState."""
        tr = self.trainer
        t = tr.t
        ckpt = last_checkpoint(tr.run_dir)
        if ckpt is None:
            raise CheckpointError(
                f"cannot resume: {tr.run_dir} holds no saved training state (start it without --resume)"
            )
        tr.state, tr.hidden, extra = load_training_state(ckpt, tr.model, tr.optimizer, tr.device)
        s = tr.state
        if tr.world.enabled:
            tr.hidden = take_share(tr.world, tr.hidden, extra, tr.device, reseed=t.seed + s.step)
        tr.lr.resumed(s)
        if s.averaging_since is not None:
            tr.average = restore_average(tr.model, extra)
        if s.epoch > t.epochs or (t.max_steps is not None and s.step >= t.max_steps):
            raise ConfigError(
                [
                    f"nothing to resume: {tr.run_dir} already ran {s.step} steps into epoch {s.epoch}; "
                    "raise --epochs or --max-steps (or --set train.max_steps=null)"
                ]
            )
        tr.clock.before = s.elapsed_s
        if t.time_budget and tr.clock.out_of_time():
            raise ConfigError(
                [
                    f"nothing to resume: {tr.run_dir} already used its time budget of "
                    f"{t.time_budget:g} minutes; raise --time-budget"
                ]
            )
        tr.logs.open(resumed_at=s.step)  # the log lines after the checkpoint come again
        log(f"resuming {tr.run_dir} from {ckpt} at epoch {s.epoch}, step {s.step}")

    def due(self) -> bool:
        """Whether a step checkpoint is due now (train.checkpoint_every, train.checkpoint_minutes)."""
        tr = self.trainer
        t = tr.t
        if t.checkpoint_every is not None and tr.state.step % t.checkpoint_every == 0:
            return True
        if t.checkpoint_minutes is None:
            return False
        return tr.world.any(time.perf_counter() - self.last_save >= 60 * t.checkpoint_minutes)  # clocks differ

    def save(self, best: bool, measured: dict[str, Any] | None = None) -> Path:
        """Write a step checkpoint: the weights to evaluate, and everything --resume needs;
        `measured`, the validation just run on these weights, goes into its config.json."""
        tr = self.trainer
        s = tr.state
        tr.sync()
        if not torch.stack([torch.isfinite(p).all() for p in tr.model.parameters()]).all().item():
            raise TrainingError(
                f"the weights are not finite numbers at step {s.step}; "
                "not saving them over the last good checkpoint. Lower the learning rate"
            )
        s.elapsed_s = tr.clock.elapsed()
        hidden, extra = resume_tensors(tr.world, tr.hidden, tr.average, tr.device)

        def fill(folder: Path) -> None:
            with tr.eval_weights():
                save_checkpoint(folder, tr.model, tr.corpus.tokenizer, tr.cfg, measured)
            save_training_state(folder, tr.model, tr.optimizer, s, hidden, extra)

        saved = tr.run_dir / CHECKPOINTS / LAST
        if tr.world.main:  # rank 0 alone writes
            saved = save_step_checkpoint(tr.run_dir, s.step, fill, best, tr.t.keep_last)
            update_latest(tr.run_dir)
        tr.world.barrier()  # no rank reads a checkpoint before it is whole
        self.last_save = time.perf_counter()
        self.saved = (s.step, saved)
        return saved

    def finish(self, ended_by: str) -> dict[str, Any]:
        """Evaluate the best checkpoint on the test split and summarise the run (`ended_by`: why it ended)."""
        tr = self.trainer
        s, t = tr.state, tr.t
        best_dir = resolve_checkpoint(tr.run_dir)
        # (a diverged run has validated, so it has a best validation loss)
        if tr.diverged and is_diverged(best_ppl := math.exp(min(s.best_val_loss, 700)), tr.corpus.vocab_size):
            raise TrainingError(
                f"training diverged: no validation was better than {best_ppl:.6g} "
                f"(twice a uniform guess over {tr.corpus.vocab_size:,} words is {DIVERGED * tr.corpus.vocab_size:,}), "
                f"so there is no model worth testing; {tr.run_dir} keeps the logs. Train again with --overwrite: "
                f"where a rate is on the edge, float rounding decides the start. If it diverges again, {REMEDY}"
            )
        best, _, _ = load_checkpoint(best_dir, tr.device)
        test_data = Streams(tr.corpus.splits["test"], t.eval_batch_size, tr.device)
        test_data = test_data[:, tr.world.share(t.eval_batch_size, "train.eval_batch_size")]
        test = evaluate_streams(best, test_data, t.bptt, tr.precision, tr.world) if test_data.size(0) > 1 else None
        summary = _summary(s, tr.run_dir, best_dir, test, tr.clock) | {"ended_by": ended_by}
        log(
            f"best model in {summary['best_checkpoint']}: valid ppl {summary['best_valid_perplexity']:.6g}"
            + (f", test ppl {summary['test_perplexity']:.6g}" if test else "")
        )
        return summary


class _TrainingLoss(torch.nn.Module):
    """`model.training_loss` as a module's forward, so that DistributedDataParallel (which
    hooks a module's forward) can wrap it; `compiled` is its torch.compile'd version."""

    def __init__(self, model: LSTMLanguageModel, compile: bool, mode: str = "default"):
        super().__init__()
        self.model = model
        self.compiled = compile_loss(model, mode) if compile else None

    def forward(self, x, y, hidden, ar=0.0, tar=0.0, compiled=False):
        return (self.compiled if compiled and self.compiled is not None else self.model.training_loss)(
            x, y, hidden, ar, tar
        )

    def for_chunk(self, chunk: int, bptt: int, ddp: DistributedDataParallel | None) -> Callable | None:
        """The loss for a chunk of `chunk` steps: compiled for the full length (a chunk of
        another length, the epoch's last, runs eagerly rather than compiling anew), through
        DDP when distributed; None for model.training_loss itself."""
        compiled = self.compiled is not None and chunk == bptt
        if ddp is not None:
            return functools.partial(ddp, compiled=compiled)
        return self.compiled if compiled else None


def steps_record(s: TrainState, meter: LossMeter, interval_s: float, clock: Clock) -> dict[str, Any]:
    """A line of steps.jsonl: the mean loss of the steps since the last line and their own
    tokens/s (the time between the two lines, validation left out), and the mean tokens/s
    since the epoch began."""
    return {
        "step": s.step,
        "epoch": s.epoch,
        "lr": s.lr,
        "loss": meter.loss / meter.tokens,
        "tokens_per_s": meter.tokens / max(interval_s, 1e-9),
        "epoch_tokens_per_s": s.epoch_tokens / max(s.epoch_time_s, 1e-9),
        "elapsed_s": round(clock.elapsed(), 2),
    }


def evaluate_streams(
    model: LSTMLanguageModel, data: torch.Tensor, bptt: int, precision: str, world: World
) -> dict[str, float]:
    """`evaluate` on this rank's streams, summed over ranks: the whole split's result."""
    out = evaluate(model, data, bptt, precision)
    n = out["tokens"]
    loss, tokens, top1, top5 = world.sum([out["loss"] * n, n, out["top1_accuracy"] * n, out["top5_accuracy"] * n])
    loss /= max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": int(tokens),
        "top1_accuracy": top1 / max(tokens, 1),
        "top5_accuracy": top5 / max(tokens, 1),
    }


def reserve_evaluation_time(
    clock: Clock, model: LSTMLanguageModel, data: torch.Tensor, t: TrainConfig, precision: str, eval_tokens: int
) -> None:
    """Time the evaluation of a few chunks of `data` (the fastest of three, after a first
    call that pays the one-off costs) and have the clock keep enough for `eval_tokens`;
    refuse a budget that leaves no time to train."""
    probe = data[: 8 * t.bptt + 1]
    evaluate(model, probe[: t.bptt + 1], t.bptt, precision)
    timings = []
    for _ in range(3):  # a busy moment of the machine says little
        start = time.perf_counter()
        result = evaluate(model, probe, t.bptt, precision)
        timings.append(time.perf_counter() - start)
    clock.time_reserve(min(timings), result["tokens"], eval_tokens)
    if clock.out_of_time():
        raise ConfigError(
            [
                f"train.time_budget: {t.time_budget:g} minutes leave no time to train: {clock.elapsed():.0f} s are "
                f"gone and the final validation and test need about {clock.reserve_s:.0f} s; raise --time-budget"
            ]
        )


def _describe(
    model: LSTMLanguageModel, corpus: Corpus, t: TrainConfig, device: torch.device, precision: str, n_batches: int
) -> str:
    output = (
        f"adaptive softmax (cutoffs {model.adaptive.bounds[:-1]})"
        if model.adaptive is not None
        else f"{model.loss_impl} loss"
    )
    compiled = f", compiled{f' ({t.compile_mode})' if t.compile_mode != 'default' else ''}" if t.compile else ""
    return (
        f"model: {model.cell}, {model.num_parameters():,} parameters, impl {model.impl}, "
        f"vocab {corpus.vocab_size:,}, device {device}, precision {precision}, {output}{compiled}; "
        f"data: {len(corpus.splits['train']):,} train tokens, "
        f"{n_batches:,} batches of {t.batch_size}x{t.bptt} per epoch"
        + (f"; time budget {t.time_budget:g} min" if t.time_budget else "")
    )


def end_reason(trainer: Trainer) -> str:
    """Why a run that was not interrupted ended: diverged, stop_lr, max_steps, time_budget or
    epochs (the first that holds, in that order)."""
    t, s = trainer.t, trainer.state
    if trainer.diverged:
        return "diverged"
    if trainer.lr.below_stop_lr(s):
        return "stop_lr"
    if steps_done(t, s):
        return "max_steps"
    return "time_budget" if trainer.clock.out_of_time() else "epochs"


def steps_done(t: TrainConfig, s: TrainState) -> bool:
    """train.max_steps, where set, are done."""
    return t.max_steps is not None and s.step >= t.max_steps


DIVERGED = 2  # a validation's perplexity above this many times the vocabulary's size: training has diverged
REMEDY = "lower train.lr, or set train.warmup_steps (a few hundred) or a smaller train.clip"


def is_diverged(perplexity: float, vocab_size: int) -> bool:
    """More than DIVERGED times a uniform guess's perplexity (an untrained model's is about the
    vocabulary's size); a NaN counts as diverged."""
    return not perplexity <= DIVERGED * vocab_size


def check_divergence(perplexity: float, vocab_size: int, stop: bool) -> bool:
    """Whether a validation's perplexity says that training has diverged and the run is to end
    (`stop`: train.stop_diverged, at an epoch's end only, where a high rate's first steps are
    long past and a stop-and-resume decides alike); says so either way."""
    if not is_diverged(perplexity, vocab_size):
        return False
    ends = "; the run ends here (--set train.stop_diverged=false trains on)" if stop else ""
    log(
        f"warning: valid ppl {perplexity:.6g} is more than twice a uniform guess's over the {vocab_size:,} words: "
        f"training has diverged{ends}. Train again, or {REMEDY}"
    )
    return stop


def _metrics_record(
    s: TrainState, val: dict[str, float], improved: bool, whole: bool, averaged: bool, clock: Clock
) -> dict[str, Any]:
    """A line of metrics.jsonl: the epoch's training loss and the validation just run."""
    train_loss = s.epoch_loss_sum / max(s.epoch_tokens, 1)
    return {
        "epoch": s.epoch,
        "step": s.step,
        "lr": s.lr,
        "train_loss": train_loss,
        "train_ppl": math.exp(min(train_loss, 700)),
        "val_loss": val["loss"],
        "val_ppl": val["perplexity"],
        "val_top1": val["top1_accuracy"],
        "val_top5": val["top5_accuracy"],
        "averaged": averaged,
        "tokens_per_s": s.epoch_tokens / max(s.epoch_time_s, 1e-9),
        "epoch_time_s": s.epoch_time_s,
        "elapsed_s": round(clock.elapsed(), 2),
        "complete_epoch": whole,
        "best": improved,
        "skipped_steps": s.skipped_steps,
    }


def _summary(
    s: TrainState, run_dir: Path, best_dir: Path, test: dict[str, float] | None, clock: Clock
) -> dict[str, Any]:
    """What `train` prints: the run, its best validation and its test result."""
    best_val = s.best_val_loss
    return {
        "run_dir": str(run_dir),
        "best_checkpoint": str(best_dir),
        "epochs": s.epoch - 1 if s.pos == 0 else s.epoch,
        "steps": s.step,
        "skipped_steps": s.skipped_steps,
        "best_valid_loss": best_val,
        "best_valid_perplexity": math.exp(min(best_val, 700)) if best_val is not None else None,
        "test_loss": test["loss"] if test else None,
        "test_perplexity": test["perplexity"] if test else None,
        "test_top1_accuracy": test["top1_accuracy"] if test else None,
        "test_top5_accuracy": test["top5_accuracy"] if test else None,
        "wall_s": round(clock.elapsed(), 2),
    }


def _interrupted(signal_name: str, s: TrainState, saved: Path, run_dir: Path, world: World) -> str:
    out = shlex.quote(str(run_dir))
    how = (
        f"resume with: lstm-lm train --out {out} --resume"
        if not world.enabled
        else f"resume with the same torchrun options and: -m lstm_lm train --out {out} --resume"
    )
    return f"stopped by {signal_name} at step {s.step} (epoch {s.epoch}); checkpoint saved in {saved}\n{how}"
