"""A run directory's layout and mechanics: step directories, pointers, pruning.

    runs/NAME/checkpoints/step-00001200/   one checkpoint directory:
        config.json                          settings, vocabulary size, format version
        model.safetensors                    the weights (averaged once NT-ASGD has begun)
        tokenizer.json                       the `tokenizers` tokenizer
        training_state.safetensors           what --resume needs (training_state.py)
    runs/NAME/checkpoints/last             -> the newest one (what --resume continues)
    runs/NAME/best                         -> the best by validation loss (what
                                              `--checkpoint runs/NAME` loads)
    runs/NAME/.lstm-lm-run                 the marker: lstm-lm made this run directory
    runs/NAME/metrics.jsonl, steps.jsonl   the run's logs (runlogs.py)
    runs/latest                            -> the run trained last (in the working directory,
                                              wherever --out put the run)

A checkpoint is written into a temporary directory, flushed to disk and renamed
into place; the `last` and `best` pointers move only after that, and older
checkpoints are deleted only after those. A process killed at any moment leaves
the previous checkpoint whole. Pointers are symlinks, or where the file system has
none, one-line pointer files.

lstm-lm touches only what it wrote: a directory counts as a run only with the marker
file that `train` writes into it (or, for a run made before the marker existed,
checkpoints whose config.json lstm-lm wrote); `--overwrite` deletes only the names a
run is made of, and a pointer replaces only a pointer. `check_run_dir` finds every
problem with a run directory before the corpus is read.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

from lstm_lm.errors import CheckpointError
from lstm_lm.writing import describe_write_error, fsync_dir

CONFIG, WEIGHTS, TOKENIZER, TRAINING_STATE = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "training_state.safetensors",
)
CHECKPOINTS, LAST, BEST, LATEST = "checkpoints", "last", "best", "latest"
MARKER = ".lstm-lm-run"  # written into every run directory: only a folder holding it is a run
LATEST_POINTER = Path("runs") / LATEST  # "the model trained last": train writes it, complete/eval/score read it
STEP_DIR = re.compile(r"step-(\d+)(?:-(\d+))?")  # step-00001200, or step-00001200-2 if saved again
# the `last` pointer, and the temporary link of a write it was cut off in (see `point`)
TEMPORARY_LAST = re.compile(rf"{LAST}|\.{LAST}(?:\.\d+)?\.tmp")


def point(link: Path, target: str) -> None:
    """Make `link` point at `target` (relative to the link's directory) in one atomic step:
    a symlink, or where links are not allowed a one-line pointer file. Only a pointer is
    ever replaced. The temporary name holds the process id: runs trained at once in one
    working directory all point runs/latest, and must not rename each other's link."""
    if problem := pointer_problem(link):
        raise CheckpointError(problem)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            tmp.symlink_to(target, target_is_directory=True)
        except OSError:
            tmp.write_text(target + "\n", encoding="utf-8")
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)


def follow(link: Path) -> Path:
    """Where a pointer (a symlink, or a pointer file) leads; any other path is itself."""
    if link.is_symlink():
        target = Path(os.readlink(link))
    elif link.is_file() and link.name in (LAST, BEST, LATEST):
        target = Path(link.read_text(encoding="utf-8").strip())
    else:
        return link
    return target if target.is_absolute() else link.parent / target


def pointer_problem(link: Path) -> str | None:
    """Why `link` may not be made a pointer, or None: it does not exist, or it is a
    pointer (a symlink, or a short one-line pointer file) that lstm-lm could have written."""
    if link.is_symlink() or not link.exists():
        return None
    if link.is_dir():
        return f"{link} is a real directory, not a pointer that lstm-lm wrote; move it away or choose another --out"
    try:
        if link.is_file() and link.stat().st_size <= 4096:
            lines = link.read_text(encoding="utf-8").splitlines()
            target = link.parent / lines[0].strip() if len(lines) == 1 and lines[0].strip() else None
            if target is not None and (is_run(target) or (target / CONFIG).is_file() or is_run(target.parent.parent)):
                return None
    except (OSError, UnicodeDecodeError):
        pass
    return f"{link} is a file that lstm-lm did not write; it is left as it is: move it away or choose another --out"


def update_latest(run_dir: Path, latest: Path = LATEST_POINTER) -> None:
    """Point `latest` (runs/latest in the working directory) at this run."""
    latest.parent.mkdir(parents=True, exist_ok=True)
    point(latest, os.path.relpath(run_dir.resolve(), latest.parent.resolve()))


def is_run(run_dir: Path) -> bool:
    """Whether `run_dir` is a run directory that lstm-lm made: it holds the marker, or it
    is a run made before the marker existed (step checkpoints whose config.json lstm-lm wrote)."""
    if (run_dir / MARKER).is_file():
        return True
    for d in step_checkpoints(run_dir):
        try:
            if '"lstm_lm_version"' in (d / CONFIG).read_text(encoding="utf-8")[:200_000]:
                return True
        except (OSError, UnicodeDecodeError):
            continue
    return False


def mark_run(run_dir: Path) -> None:
    """Write the marker that makes `run_dir` a run (once)."""
    from lstm_lm import __version__
    from lstm_lm.writing import write_json

    if not (run_dir / MARKER).is_file():
        write_json(run_dir / MARKER, {"made_by": "lstm-lm", "lstm_lm_version": __version__})


def holds_a_run(run_dir: Path) -> bool:
    """Whether training has saved anything in `run_dir`."""
    return any((run_dir / name).exists() or (run_dir / name).is_symlink() for name in (CHECKPOINTS, BEST))


def check_run_dir(
    run_dir: Path, resume: bool, overwrite: bool, logs: tuple[str, ...], latest: Path | None = LATEST_POINTER
) -> None:
    """Every problem with training into `run_dir` (and pointing `latest` at it), found
    before any work: a path through a file, a folder with another tool's files under the
    names a run is made of, a run that needs --resume or --overwrite, a `latest` that is
    not a pointer."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run directory")
    if any(parent.exists() and not parent.is_dir() for parent in run_dir.parents):
        raise CheckpointError(f"{run_dir}: a part of the path is a file, not a directory")
    if latest is not None and (problem := pointer_problem(latest)):
        raise CheckpointError(problem)
    if not run_dir.is_dir():
        if resume:
            raise CheckpointError(f"cannot resume: {run_dir} holds no saved run (start it without --resume)")
        return
    ours = is_run(run_dir)
    taken = [name for name in (CHECKPOINTS, BEST, *logs) if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    if taken and not ours:
        raise CheckpointError(
            f"{run_dir} holds {', '.join(taken)}, which lstm-lm did not write (there is no {MARKER} marker); "
            "nothing there is touched: choose another --out"
        )
    for name in (BEST, f"{CHECKPOINTS}/{LAST}"):
        if problem := pointer_problem(run_dir / name):
            raise CheckpointError(problem)
    if resume:
        if not ours:
            raise CheckpointError(f"cannot resume: {run_dir} holds no saved run (start it without --resume)")
    elif not overwrite and holds_a_run(run_dir):
        raise CheckpointError(
            f"{run_dir} already holds a run; continue it with --resume, start it again with --overwrite "
            "(which deletes it), or choose another --out"
        )


def clear_run(run_dir: Path, logs: tuple[str, ...]) -> None:
    """Delete what an earlier run left in `run_dir`, and only that: its step checkpoints,
    pointers and `logs`. Anything else in the folder stays."""
    folder = run_dir / CHECKPOINTS
    if folder.is_dir() and not folder.is_symlink():
        for d in folder.iterdir():
            if d.is_dir() and not d.is_symlink() and STEP_DIR.fullmatch(d.name.lstrip(".").split(".")[0]):
                shutil.rmtree(d)  # step-N, and the .step-N.tmp / .step-N.deleting of interrupted writes
            elif TEMPORARY_LAST.fullmatch(d.name) and (d.is_symlink() or pointer_problem(d) is None):
                d.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing of anyone else's is left in it
    for name in (BEST, *logs):
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
    return (
        f"the last good checkpoint is {last} (continue from it with: lstm-lm train --out "
        f"{shlex.quote(str(run_dir))} --resume --lr SMALLER)"
    )


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
        reason = describe_write_error(e)
        raise CheckpointError(f"could not save the checkpoint {final}: {reason}; {keeps} is unchanged") from None


def save_step_checkpoint(
    run_dir: Path,
    step: int,
    fill: Callable[[Path], None],
    best: bool,
    keep_last: int,
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
