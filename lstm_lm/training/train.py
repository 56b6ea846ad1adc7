"""`lstm-lm train`: set a run up, train it (trainer.py), summarise it.

    summary = train(load_config("ptb-small"), out_dir="runs/ptb-small")
    summary = train(cfg, "runs/ptb-small", resume=True)   # continue from checkpoints/last

Setting up is everything around the loop: the rules for a run directory that
already holds a run (refused, unless --resume continues it or --overwrite deletes
it; only a folder that lstm-lm marked as a run, and only what it wrote there), its lock
(one process trains a run directory at a time), the process group of
a torchrun launch, and the default run name. The run directory holds its
checkpoints (rundir.py) and logs (runlogs.py). Ctrl-C or SIGTERM stops the run
after the current step with a resumable checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lstm_lm import utils
from lstm_lm.checkpoint import load_config_json
from lstm_lm.config import Config
from lstm_lm.data import Corpus
from lstm_lm.errors import CheckpointError, ConfigError
from lstm_lm.training import distributed
from lstm_lm.training.clock import Clock
from lstm_lm.training.distributed import World
from lstm_lm.training.rundir import CONFIG, check_run_dir, clear_run, last_checkpoint, mark_run
from lstm_lm.training.runlock import RunInUseError, RunLock
from lstm_lm.training.runlogs import LOGS, RunLog
from lstm_lm.training.trainer import Trainer


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    corpus: Corpus | None = None,
    started: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or with `resume`, continue) a run in `out_dir`; returns a summary of the run.

    `started` (a time.perf_counter() value, default now) is when the run's clock starts:
    the command line passes the moment the command began, before torch was imported.
    A directory that already holds a run is refused unless `resume` or `overwrite`.
    """
    utils.keep_freed_memory()  # large CPU tensors reuse their pages: see its docstring
    run_dir = Path(out_dir)
    check_run_dir(run_dir, resume, overwrite, LOGS)  # every problem with it, before any work
    clock = Clock(cfg.train.time_budget, start=started)
    world = distributed.setup(cfg.train.device)  # a single process unless started by torchrun
    utils.QUIET = not world.main
    try:
        # The trainer (with its DistributedDataParallel) is out of reach when _train returns,
        # and teardown() frees it before the group: see there.
        summary = _train(cfg, run_dir, world, clock, resume, corpus)
        world.barrier()  # every rank leaves together: none destroys its group under another's last steps
        return summary
    except RuntimeError as e:
        if world.enabled and distributed.lost_a_process(e):
            raise distributed.LostProcess(run_dir, last_checkpoint(run_dir), e) from None
        raise
    finally:
        distributed.teardown()


def _train(
    cfg: Config, run_dir: Path, world: World, clock: Clock, resume: bool, corpus: Corpus | None
) -> dict[str, Any]:
    logs = RunLog(run_dir, cfg.train.logger, enabled=world.main)
    trainer = Trainer(cfg, run_dir, world, clock, logs, corpus)  # the data loads before RUN is made
    with locked(run_dir, world):
        if world.main:
            mark_run(run_dir)  # what makes the folder a run: only lstm-lm's runs are ever resumed or cleared
        if resume:
            trainer.checkpoints.resume()
        else:
            world.barrier()  # every rank has looked at the directory before rank 0 clears it
            if world.main:
                clear_run(run_dir, LOGS)
            logs.open()
        try:
            return trainer.fit()
        finally:
            logs.close()


@contextlib.contextmanager
def locked(run_dir: Path, world: World) -> Iterator[None]:
    """Hold the run directory's lock for the block; rank 0 holds it for every rank."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir) if world.main else None
    refused = None
    try:
        if lock is not None:
            lock.acquire()
    except RunInUseError as e:
        refused = e
    if world.any(refused is not None):
        raise refused or RunInUseError(f"{run_dir} is in use by another process")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def run_training(
    config: str | Path | None,
    data: str | None,
    out: str | Path | None,
    resume: bool,
    overrides: list[str],
    started: float | None = None,
    overwrite: bool = False,
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
            raise ConfigError(
                ["--resume continues the run's own config; change it with --set or options, not --config"]
            )
        ckpt = last_checkpoint(Path(out))
        if ckpt is None or not (ckpt / CONFIG).is_file():
            raise CheckpointError(f"cannot resume: {out} holds no saved run (start it without --resume)")
        saved, _ = load_config_json(ckpt)
        cfg = load_config(None, overrides, preset=saved.to_dict(), values=values)
        return train(cfg, out, resume=True, started=started)
    if config is None and data is None:
        cfg = demo_config(overrides, values)
    else:
        cfg = load_config(config, overrides, values=values)
    return train(cfg, out if out is not None else default_run_dir(config, cfg), started=started, overwrite=overwrite)


def default_run_dir(config: str | Path | None, cfg: Config) -> Path:
    """runs/NAME: the recipe's name, else "demo" or the corpus's name."""
    if config is not None:
        return Path("runs") / Path(config).stem
    return Path("runs") / ("demo" if cfg.data.source == "demo" else Path(cfg.data.source).stem)
