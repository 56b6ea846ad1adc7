"""A run directory in use is locked, so that a second `train`, `--resume` or
`--overwrite` cannot write into it, or delete it, under the process training it.

    with RunLock("runs/demo"):
        ...  # train

The lock is `RUN/.lock`, holding the owner's pid, and an advisory `flock` on it: the
kernel drops that when the process ends however it ends (Ctrl-C, SIGKILL, a crash),
so a lock file left behind by a dead process is stale and simply taken over.
"""

from __future__ import annotations

import os
from pathlib import Path

from lstm_lm.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid alone decides
    fcntl = None

LOCK = ".lock"


class RunInUseError(CheckpointError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory for the life of a `with` block."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not self._lock(fd):
            os.close(fd)
            owner = _read_pid(self.path)
            raise RunInUseError(
                f"{self.path.parent} is in use by process {owner if owner is not None else '(unknown)'} "
                "(another lstm-lm train); wait for it to end or stop it before training, resuming or "
                "overwriting this run, or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                return False
        owner = _read_pid(self.path)
        return owner is None or owner == os.getpid() or not _alive(owner)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: no one else's lock is removed
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
