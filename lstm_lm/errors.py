"""Exceptions for problems the user can fix. The CLI prints them as one `error: ...` line."""

import errno
import os


class LSTMLMError(Exception):
    """Base class: a message that says what went wrong and what to do about it."""


class ConfigError(LSTMLMError, ValueError):
    """One or more bad config values; all of them are listed in one message."""

    def __init__(self, problems: list[str], origin: str = "config"):
        self.problems, self.origin = list(problems), origin
        super().__init__(f"bad config ({origin}): " + "; ".join(self.problems))


class DataError(LSTMLMError):
    """Missing, empty or unreadable corpus."""


class CheckpointError(LSTMLMError):
    """Missing or unreadable checkpoint directory."""


class PromptError(LSTMLMError):
    """A prompt the model cannot continue (empty, for example)."""


class ArgumentError(LSTMLMError, ValueError):
    """An argument out of its bounds or of the wrong type (arguments.py declares them)."""


class WriteError(LSTMLMError):
    """An output could not be written (a full disk, a closed stdout ...); nothing half-written is left."""


class TrainingError(LSTMLMError):
    """Training cannot go on (the loss stopped being a finite number, for example)."""


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; not an error. The CLI
    prints the message and exits with `exit_code` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_OS_REASONS = {
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory, not a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENOENT: "does not exist",
    errno.EEXIST: "already exists",
}


def describe_os_error(e: OSError) -> str:
    """'runs/x: a part of the path is a file, not a directory': the path and what is wrong with it."""
    reason = _OS_REASONS.get(e.errno, e.strerror or str(e))
    if e.errno == errno.EEXIST and e.filename is not None and os.path.isfile(e.filename):
        reason = "is a file, so no directory can be made there"  # mkdir of a folder that a file stands in for
    return f"{e.filename}: {reason}" if e.filename is not None else reason
