"""A run's logs: JSONL files in the run directory, and TensorBoard event files with
`train.logger: tensorboard`.

    log = RunLog(run_dir, logger="jsonl")
    log.write(STEPS, {"step": 100, "loss": 5.1, ...})
    rows = read_run_logs(run_dir)["metrics"]

metrics.jsonl has a line per validation, steps.jsonl one every `log_interval` steps,
grad_flow.jsonl (with --log-grad-flow) the gradient reaching back through time.
A resumed run first drops the lines after its checkpoint, which it writes again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lstm_lm.errors import ConfigError, DataError
from lstm_lm.writing import write_text

METRICS, STEPS, GRAD_FLOW = "metrics.jsonl", "steps.jsonl", "grad_flow.jsonl"
TENSORBOARD = "tensorboard"  # the event files' folder
LOGS = (METRICS, STEPS, GRAD_FLOW, TENSORBOARD)

# What each log's records show in TensorBoard: its tag for a record's key.
SCALARS = {
    STEPS: {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s"},
    METRICS: {
        "train_loss": "epoch/train_loss",
        "val_loss": "valid/loss",
        "val_ppl": "valid/perplexity",
        "val_top1": "valid/top1_accuracy",
        "val_top5": "valid/top5_accuracy",
    },
}


def append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate(path: Path, step: int) -> None:
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
    write_text(path, "".join(f"{line}\n" for line in kept))


def read(path: Path) -> list[dict]:
    """The records of a .jsonl log ([] where it does not exist)."""
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}, line {n}: not JSON; the log is damaged") from None
    return rows


def read_run_logs(run_dir: str | Path) -> dict[str, list[dict]]:
    """A run's logs: steps, metrics and (gradient) flow, each [] where absent."""
    run_dir = Path(run_dir)
    return {"steps": read(run_dir / STEPS), "metrics": read(run_dir / METRICS), "flow": read(run_dir / GRAD_FLOW)}


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            [
                "train.logger: tensorboard needs the tensorboard package; "
                "install it with: pip install 'lstm-lm[tensorboard]'"
            ]
        ) from None
    return SummaryWriter


class RunLog:
    """Where a run's records go: the JSONL logs always, TensorBoard as well with
    logger "tensorboard". Only the process that writes (`enabled`, rank 0) touches files."""

    def __init__(self, run_dir: Path, logger: str = "jsonl", enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self._writer_class = _summary_writer() if logger == "tensorboard" else None  # fails before any work
        self._writer = None

    def open(self, resumed_at: int | None = None) -> None:
        """Start writing; `resumed_at`, the step a resume continues from, drops what came after it."""
        if not self.enabled:
            return
        if resumed_at is not None:
            for name in (METRICS, STEPS, GRAD_FLOW):
                truncate(self.run_dir / name, resumed_at)
        if self._writer_class is not None:
            purge = None if resumed_at is None else resumed_at + 1  # events from this step on are dropped
            self._writer = self._writer_class(str(self.run_dir / TENSORBOARD), purge_step=purge)

    def write(self, name: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append(self.run_dir / name, record)
        if self._writer is not None:
            for key, tag in SCALARS.get(name, {}).items():
                if record.get(key) is not None:
                    self._writer.add_scalar(tag, record[key], record["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
