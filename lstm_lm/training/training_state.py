"""The resume state: what a step checkpoint holds beyond the inference checkpoint.

    save_training_state(folder, model, optimizer, state, hidden, extra)
    state, hidden, extra = load_training_state(folder, model, optimizer, device)

training_state.safetensors holds the latest weights (not the averaged ones), the
optimizer's tensors, the RNG states and the hidden state the next chunk starts from,
as tensors; `TrainState` (step, epoch, data position, learning rate, validation
history, time used) and the optimizer's settings are JSON in the file's metadata.
A resumed run continues bit for bit where the saved one would have gone on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lstm_lm.checkpoint import load_weights, refuse_pickles, weights_to_save
from lstm_lm.config import FORMAT_VERSION
from lstm_lm.errors import CheckpointError
from lstm_lm.model import State
from lstm_lm.training.distributed import World
from lstm_lm.training.optim import WeightAverage
from lstm_lm.training.rundir import TRAINING_STATE
from lstm_lm.utils import log
from lstm_lm.writing import write_atomically


@dataclass
class TrainState:
    """Where a run stands: everything about its progress, saved and restored whole."""

    lr: float  # the rate of the latest step (optim.LearningRate sets it)
    lr_peak: float  # the schedule's top: train.lr less its decays
    lr_set: float  # the train.lr it began from; another --lr on a resume replaces it
    step: int = 0  # optimizer steps taken
    epoch: int = 1  # the epoch in progress, from 1
    batch: int = 0  # batches done in this epoch
    pos: int = 0  # the row of the training streams the next chunk starts at
    best_val_loss: float | None = None
    val_losses: list[float] = field(default_factory=list)  # at each whole epoch's end; NT-ASGD reads them
    averaging_since: int | None = None  # the step NT-ASGD began averaging the weights at
    skipped_steps: int = 0  # updates skipped for a loss or gradient that was not finite
    epoch_loss_sum: float = 0.0  # this epoch's training loss, summed over ...
    epoch_tokens: int = 0  # ... this many tokens
    epoch_time_s: float = 0.0  # this epoch's training time, validation left out
    elapsed_s: float = 0.0  # the run's wall time, every session of it

    @classmethod
    def start(cls, lr: float) -> TrainState:
        return cls(lr=lr, lr_peak=lr, lr_set=lr)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch = self.pos = self.epoch_tokens = 0
        self.epoch_loss_sum = self.epoch_time_s = 0.0


def save_training_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    hidden: State | None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Latest weights, optimizer, RNG and hidden state as tensors; `state` (JSON) in the metadata.

    `extra` tensors (the NT-ASGD weight average, every rank's RNG) are stored under their own names.
    """
    tensors = {f"model.{name}": t for name, t in weights_to_save(model).items()}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for k, layer in enumerate(hidden or []):  # (h, c) for an LSTM, (h,) for a GRU: the cell's state_names
        for name, t in zip(model.rnn.cells[k].state_names, layer, strict=True):
            tensors[f"hidden.{k}.{name}"] = t
    for name, t in (extra or {}).items():
        tensors[f"extra.{name}"] = t
    meta = {
        "format_version": FORMAT_VERSION,
        "state": dataclasses.asdict(state),
        "param_groups": opt["param_groups"],
        "optim_scalars": opt_scalars,
    }
    # Copies: safetensors refuses tensors that share memory (views of one buffer).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    write_atomically(
        folder / TRAINING_STATE, lambda tmp: save_file(tensors, str(tmp), metadata={"json": json.dumps(meta)})
    )


def load_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[TrainState, State | None, dict[str, torch.Tensor]]:
    """Restore what `save_training_state` wrote into `folder` (weights, optimizer, RNG);
    returns the TrainState, the hidden state and the `extra` tensors."""
    path = folder / TRAINING_STATE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (was the run started with this --out?)")
    refuse_pickles(folder)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"cannot resume from {path}: it holds training-state format {version}, this lstm-lm resumes "
            f"format {FORMAT_VERSION}; resume it with the lstm-lm that saved it (its weights still load "
            "for complete and eval)"
        )
    try:
        state = TrainState(**meta["state"])
    except TypeError as e:
        raise CheckpointError(f"cannot resume from {path}: its state is damaged ({e})") from None
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v.to(device)
    try:
        load_weights(model, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        for idx, scalars in meta["optim_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"cannot resume from {path}: it does not fit this model and optimizer ({str(e).splitlines()[0]})"
        ) from None
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda_keys and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda_keys])
    layers = sum(1 for k in tensors if k.startswith("hidden.") and k.endswith(".h"))
    try:
        hidden = [
            tuple(tensors[f"hidden.{k}.{name}"].to(device) for name in model.rnn.cells[k].state_names)
            for k in range(layers)
        ] or None
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"cannot resume from {path}: its hidden state does not fit this model ({e})") from None
    extra = {k[len("extra.") :]: v.to(device) for k, v in tensors.items() if k.startswith("extra.")}
    return state, hidden, extra


# -- what a run adds to the saved tensors ----------------------------------------------------


def resume_tensors(
    world: World, hidden: State | None, average: WeightAverage | None, device: torch.device
) -> tuple[State | None, dict[str, torch.Tensor]]:
    """The hidden state and extra tensors to save: the NT-ASGD average, and in a
    distributed run the whole batch's state and every rank's RNG (gathered to all)."""
    extra = {}
    if average is not None:
        extra = {f"average.{i}": a for i, a in enumerate(average.averages)}
        extra["average.count"] = torch.tensor(average.count)
    if world.enabled:
        hidden = [tuple(world.gather(t) for t in layer) for layer in hidden] if hidden else None
        extra["rng.ranks"] = world.gather(torch.get_rng_state()[None])
        if device.type == "cuda":
            extra["rng.cuda_ranks"] = world.gather(torch.cuda.get_rng_state()[None])
    return hidden, extra


def restore_average(model: torch.nn.Module, extra: dict[str, torch.Tensor]) -> WeightAverage:
    n = len(list(model.parameters()))
    return WeightAverage(
        model, count=int(extra["average.count"].item()), averages=[extra[f"average.{i}"] for i in range(n)]
    )


def take_share(
    world: World, hidden: State | None, extra: dict[str, torch.Tensor], device: torch.device, reseed: int
) -> State | None:
    """A distributed resume: this rank's streams of the saved state, and its own RNG
    (or, saved by a run with another number of processes, seeded from `reseed`)."""
    if hidden is not None:
        rows = world.share(hidden[0][0].size(0), "the saved hidden state's batch")
        hidden = [tuple(t[rows] for t in layer) for layer in hidden]
    ranks = extra.get("rng.ranks")
    if ranks is not None and ranks.size(0) == world.size:
        torch.set_rng_state(ranks[world.rank].cpu().clone())  # a row of its own
        if device.type == "cuda" and "rng.cuda_ranks" in extra:
            torch.cuda.set_rng_state(extra["rng.cuda_ranks"][world.rank].cpu().clone())
    else:
        log(f"the checkpoint holds no RNG state for {world.size} processes; seeding each anew")
        torch.manual_seed(reseed + world.rank)
    return hidden
