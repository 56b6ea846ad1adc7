"""A run directory's layout and mechanics: step directories, pointers, pruning.

    runs/NAME/checkpoints/step-00001200/   one checkpoint directory:
        config.json                          settings, vocabulary size, format version
        model.safetensors                    the weights (averaged once NT-ASGD has begun)
        tokenizer.json                       the `tokenizers` tokenizer
        training_state.safetensors           what --resume needs (training_state.py)
    runs/NAME/checkpoints/last             -> the newest one (what --resume continues)
    runs/NAME/best                         -> the best by validation loss (what
                                              `--checkpoint runs/NAME` loads)
    runs/latest                            -> the run trained last
    runs/NAME/metrics.jsonl, steps.jsonl   the run's logs (runlogs.py)

A checkpoint is written into a temporary directory, flushed to disk and renamed
into place; the `last` and `best` pointers move only after that, and older
checkpoints are deleted only after those. A process killed at any moment leaves
the previous checkpoint whole. Pointers are symlinks, or where the file system has
none, one-line pointer files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Callable

from lstm_lm.errors import CheckpointError, WriteError
from lstm_lm.writing import describe_write_error, fsync_dir

CONFIG, WEIGHTS, TOKENIZER, TRAINING_STATE = (
    "config.json", "model.safetensors", "tokenizer.json", "training_state.safetensors",
)
CHECKPOINTS, LAST, BEST, LATEST = "checkpoints", "last", "best", "latest"
STEP_DIR = re.compile(r"step-(\d+)(?:-(\d+))?")  # step-00001200, or step-00001200-2 if saved again


def point(link: Path, target: str) -> None:
    """Make `link` point at `target` (relative to the link's directory) in one atomic step:
    a symlink, or where links are not allowed a one-line pointer file."""
    if link.is_dir() and not link.is_symlink():
        raise CheckpointError(f"{link} is a real directory; move it away so it can point at {target}")
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(target, target_is_directory=True)
    except OSError:
        tmp.write_text(target + "\n", encoding="utf-8")
    os.replace(tmp, link)


def follow(link: Path) -> Path:
    """Where a pointer (a symlink, or a pointer file) leads; any other path is itself."""
    if link.is_symlink():
        target = Path(os.readlink(link))
    elif link.is_file() and link.name in (LAST, BEST, LATEST):
        target = Path(link.read_text(encoding="utf-8").strip())
    else:
        return link
    return target if target.is_absolute() else link.parent / target


def update_latest(run_dir: Path) -> None:
    """Point `<parent>/latest` at this run."""
    point(run_dir.parent / LATEST, run_dir.name)


def holds_a_run(run_dir: Path) -> bool:
    """Whether training has saved anything in `run_dir`."""
    return any((run_dir / name).exists() or (run_dir / name).is_symlink() for name in (CHECKPOINTS, BEST))


def clear_run(run_dir: Path, logs: tuple[str, ...]) -> None:
    """Delete what an earlier run left in `run_dir`: its checkpoints and its `logs`."""
    for name in (CHECKPOINTS, BEST, *logs):
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete step checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [d for d in folder.iterdir() if STEP_DIR.fullmatch(d.name) and d.is_dir() and not d.is_symlink()]
    return sorted(found, key=_step_key)


def _step_key(d: Path) -> tuple[int, int]:
    step, again = STEP_DIR.fullmatch(d.name).groups()
    return int(step), int(again or 1)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint --resume continues: `checkpoints/last`, else the newest step
    directory with a training state."""
    last = follow(run_dir / CHECKPOINTS / LAST)
    if (last / TRAINING_STATE).is_file():
        return last
    with_state = [d for d in step_checkpoints(run_dir) if (d / TRAINING_STATE).is_file()]
    return with_state[-1] if with_state else None


def resume_hint(run_dir: Path) -> str:
    """Where a failed run can be continued from, for its error message."""
    last = last_checkpoint(run_dir)
    if last is None:
        return "nothing had been saved yet"
    return (f"the last good checkpoint is {last} (continue from it with: lstm-lm train --out "
            f"{shlex.quote(str(run_dir))} --resume --lr SMALLER)")


def write_checkpoint_dir(final: Path, fill: Callable[[Path], None], keeps: str) -> None:
    """Fill a temporary directory beside `final` (a new name) with `fill(tmp)`, flush it
    and rename it to `final`: readers (and a crash) see the whole directory or none of it.

    A failure (a full disk, say) removes the temporary directory and raises a
    CheckpointError saying that `keeps`, the previous checkpoint, is untouched.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except Exception as e:  # whichever library failed to write (safetensors, tokenizers, the OS)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = describe_write_error(e.__cause__ if isinstance(e, WriteError) and e.__cause__ else e)
        raise CheckpointError(f"could not save the checkpoint {final}: {reason}; {keeps} is unchanged") from None


def save_step_checkpoint(
    run_dir: Path, step: int, fill: Callable[[Path], None], best: bool, keep_last: int,
) -> Path:
    """Write `checkpoints/step-N` with `fill`, then point `last` (and with `best`, the
    run's `best`) at it, then delete all but the newest `keep_last` and the best."""
    # A step saved again (a run resumed from an older checkpoint) gets a new name, so
    # that no directory is ever replaced in place.
    final, again = run_dir / CHECKPOINTS / f"step-{step:08d}", 1
    while final.exists():
        again += 1
        final = run_dir / CHECKPOINTS / f"step-{step:08d}-{again}"
    previous = last_checkpoint(run_dir)
    keeps = f"the previous checkpoint ({previous})" if previous is not None else "nothing saved before"
    write_checkpoint_dir(final, fill, keeps)
    point(run_dir / CHECKPOINTS / LAST, final.name)
    if best:
        point(run_dir / BEST, f"{CHECKPOINTS}/{final.name}")
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete step checkpoints beyond the newest `keep_last`, never the best or the last,
    and leftovers of interrupted writes."""
    kept = {follow(run_dir / BEST).resolve(), follow(run_dir / CHECKPOINTS / LAST).resolve()}
    steps = step_checkpoints(run_dir)
    for d in steps[: max(len(steps) - keep_last, 0)]:
        if d.resolve() not in kept:
            # Renamed first, so that a half-deleted checkpoint never shows under a step name.
            doomed = d.with_name(f".{d.name}.deleting")
            os.rename(d, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for d in (run_dir / CHECKPOINTS).glob(".step-*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
