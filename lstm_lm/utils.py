"""Small helpers shared by the commands: stderr logging and device choice.

    device = pick_device("auto")   # CUDA, then MPS, then CPU
    log("reading corpus ...")      # to stderr: stdout carries results only
"""

from __future__ import annotations

import sys

import torch

from lstm_lm.config import is_device_name
from lstm_lm.errors import ConfigError


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA, then MPS, then CPU; anything else is checked to exist."""
    if not is_device_name(name):
        raise ConfigError([f"device: must be auto, cpu, cuda, cuda:N or mps, got {name!r}"])
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"device: {name} asked for, but no CUDA device is available (use cpu or auto)"])
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError([f"device: {name} asked for, but there are {torch.cuda.device_count()} CUDA devices"])
    if name == "mps" and not _mps_available():
        raise ConfigError(["device: mps asked for, but MPS is not available (use cpu or auto)"])
    return torch.device(name)
