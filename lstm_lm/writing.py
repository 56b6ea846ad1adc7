"""Every write of lstm-lm, one discipline: whole or not at all, and a failure is one error.

    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))   # the old file or the new, never half
    write_json(path, {"a": 1})
    emit(dumps(result))          # a result line on stdout, valid JSON, flushed now

A file is written under a temporary name beside its destination, flushed and renamed
into place. Whatever library does the writing (safetensors, tokenizers, onnx,
matplotlib), a failure of it (a full disk, a read-only file system) becomes one
WriteError that names the file and why, and the temporary file is removed; the old
file, if there was one, is untouched. Results on stdout are flushed as they are
written, so that a full or closed stdout is an error of the command, not a traceback
at exit. Torch-free, so that the command line can import it before torch.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lstm_lm.errors import WriteError, describe_os_error

# How libraries that do not raise OSError say that the disk is full (safetensors: its
# Rust io::Error, "No space left on device (os error 28)", StorageFull), lowercased and
# without spaces.
_DISK_FULL = ("nospaceleft", "oserror28", "storagefull", "diskquota", "oserror122")


def describe_write_error(e: BaseException) -> str:
    """Why a write failed, in a few words: 'the disk is full', 'permission denied' ..."""
    if isinstance(e, WriteError):  # why the write it wraps failed, or its own message
        return describe_write_error(e.__cause__) if e.__cause__ is not None else str(e)
    if isinstance(e, OSError) and e.errno is not None:
        return "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else describe_os_error(e)
    text = str(e)
    if any(marker in text.lower().replace(" ", "") for marker in _DISK_FULL):
        return "the disk is full"
    first = text.splitlines()[0][:200] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)`, flush tmp to disk, give it the usual permissions and rename it
    to `path`: a reader (or a crash) sees the old file or the new one, never half of one.
    Any failure of `write` or of the flush is a WriteError; tmp is removed either way.

    The temporary name holds the process id, so processes that write the same file (the
    ranks of a distributed run sharing a cache) do not write into each other's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files readable by the owner only
        os.replace(tmp, path)
    except Exception as e:  # whichever library raised it: see describe_write_error
        raise WriteError(f"could not write {path}: {describe_write_error(e)}") from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- results on stdout -----------------------------------------------------------------


def finite_json(obj: Any) -> Any:
    """`obj` with every float that is not finite (NaN, inf) replaced by None: JSON has no
    such numbers, and Python's json would write the invalid bare words NaN and Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """json.dumps that always writes valid JSON (see finite_json)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def check_stdout() -> None:
    """Fail now, before any work, when there is no stdout to write results to (`>&-`)."""
    if sys.stdout is None:
        raise WriteError("stdout is closed, so the results could not be written; give the command an output")


def emit(text: str) -> None:
    """Write one result (a line or several) to stdout and flush it at once, so that a
    full disk or a closed pipe is this call's WriteError, not a traceback at exit."""
    check_stdout()
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except (OSError, ValueError) as e:  # ValueError: the stream was closed
        _discard_stdout()
        why = describe_write_error(e) if isinstance(e, OSError) else "it is closed"
        raise WriteError(f"could not write the results to stdout: {why}") from None


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null: what is still buffered for stdout goes there
    at exit instead of failing again with Python's 'Exception ignored' message."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
