"""Data-parallel training across processes with torchrun: the process group, each rank's
share of the batch, and the few collectives the training loop needs.

    torchrun --nproc-per-node 2 -m lstm_lm train --config configs/ptb-small.yaml

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op
and the run is an ordinary single-process one. Under torchrun the run is wrapped in
DistributedDataParallel even with one process (the check of DDP against a plain run).
The backend follows the device: NCCL for CUDA, gloo for the CPU.

The BPTT layout makes the split natural: the global batch is B parallel streams of
text, and rank r owns streams [r*B/W, (r+1)*B/W). Its hidden state stays with its own
streams, so nothing but gradients (averaged by DistributedDataParallel), a few sums
and the stop decision crosses between ranks. Checkpoints hold the whole batch's hidden
state and every rank's RNG state, gathered to rank 0, which alone writes files.
"""

from __future__ import annotations

import gc
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lstm_lm.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    enabled: bool = False  # launched by torchrun: in a process group, even of one process

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and logs."""
        return self.rank == 0

    def share(self, batch: int, what: str) -> slice:
        """This rank's streams of a batch of `batch` streams."""
        if batch % self.size:
            raise ConfigError(
                [
                    f"{what}: {batch} streams do not split evenly over {self.size} processes; "
                    f"use a multiple of {self.size}"
                ]
            )
        per = batch // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    # -- collectives (no-ops in a single process) ----------------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def max(self, value: int) -> int:
        """The largest of every rank's `value`."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's `tensor` (equal shapes), concatenated along `dim` in rank order."""
        if not self.enabled:
            return tensor
        moved = tensor.to(_collective_device()).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.size)]
        dist.all_gather(parts, moved)
        return torch.cat(parts, dim=dim).to(tensor.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = World()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device: str) -> World:
    """Join the process group torchrun describes (or none); returns this process's place.

    `device` is the config's: with CUDA each rank takes the GPU of its LOCAL_RANK.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE
    world = World(
        rank=int(os.environ["RANK"]),
        size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        enabled=True,
    )
    if dist.is_initialized():
        return world
    if _wants_cuda(device):
        torch.cuda.set_device(world.local_rank)
    # Before the group exists: this module's functions take `group=group.WORLD` as a default
    # argument, evaluated at import, and DistributedDataParallel imports it on the way. Imported
    # after init_process_group, it would hold the group for the life of the process; see teardown.
    importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group(backend="nccl" if _wants_cuda(device) else "gloo")
    return world


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def device_for(world: World, device: str) -> str:
    """The device name this rank trains on: its own GPU under CUDA, else the config's."""
    return f"cuda:{world.local_rank}" if world.enabled and _wants_cuda(device) else device


# How gloo and NCCL say that a peer is gone (a process killed, a node lost).
_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker",
    "Broken pipe",
    "NCCL communicator was aborted",
    "Socket Timeout",
    "Timed out",
)


def lost_a_process(e: BaseException) -> bool:
    """Whether `e`, raised in a collective or DDP's backward, means another rank is gone."""
    return isinstance(e, dist.DistError) or any(marker in str(e) for marker in _LOST)


class LostProcess(TrainingError):
    """Another process of the distributed run died. Every surviving rank says so (not only
    rank 0, which may be the one lost), and where the run continues from."""

    every_rank = True

    def __init__(self, run_dir, checkpoint, cause: BaseException):
        import shlex

        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
        where = (
            (
                f"the last checkpoint, {checkpoint}, is whole: continue with the same torchrun command and "
                f"lstm-lm train --out {shlex.quote(str(run_dir))} --resume"
            )
            if checkpoint
            else "nothing had been saved yet"
        )
        super().__init__(
            f"rank {os.environ.get('RANK', '?')}: another process of this distributed run was lost ({first}); {where}"
        )


def teardown() -> None:
    """Destroy the process group, and with it gloo's worker threads, while Python is whole.

    A gloo worker frees each finished collective's tensors itself, and freeing one made in
    Python takes the GIL. A worker that does so after the interpreter has begun to shut down
    is killed in the attempt, and the process aborts ("terminate called without an active
    exception") after a run that finished and saved. So nothing may keep the group alive past
    this point: the trainer and its DistributedDataParallel sit in reference cycles, collected
    here, and setup() imported the module that would otherwise pin the group for good.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
