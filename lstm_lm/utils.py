"""Small helpers shared by the commands: stderr logging, device and precision choice,
progress bars. (Files and results are written by writing.py.)

    device = pick_device("auto")                 # CUDA, then MPS, then CPU
    precision = pick_precision("auto", device)   # "bf16" where the hardware runs it natively
    with autocast(device, precision): ...
    log("reading corpus ...")                    # to stderr: stdout carries results only
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from lstm_lm.config import is_device_name
from lstm_lm.errors import ConfigError

QUIET = False  # set in the processes of a distributed run other than rank 0


def log(msg: str) -> None:
    if not QUIET:
        print(msg, file=sys.stderr, flush=True)


NOT_COMPILED: list = []  # every function marked with not_compiled


def not_compiled(fn):
    """`torch.compiler.disable(fn)` where it matters, inside a region torch.compile traces,
    and `fn` itself everywhere else. torch.compiler.disable imports torch._dynamo, 1.6 s
    of a 2-core CPU that every command would pay at start-up (`complete`, `eval`, `score`
    never compile); here the disabled function is made when first needed (`compile_loss`
    makes them all before it compiles, so that its first trace has nothing to make)."""
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return wrapper.disabled()(*args, **kwargs)
        return fn(*args, **kwargs)

    def make_disabled():
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0]

    wrapper.disabled = make_disabled
    NOT_COMPILED.append(wrapper)
    return wrapper


class _NoRandomFill(TorchFunctionMode):
    """A meta tensor has no values to fill: `normal_` (nn.Embedding's own initialiser) is
    skipped, which on the meta device would run torch._refs and import torch._dynamo,
    1.6 s of every command that loads a checkpoint."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "normal_":  # nn.init.normal_(tensor=...) or Tensor.normal_
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextlib.contextmanager
def shapes_only():
    """Modules built inside have parameters of the right shapes and no memory or values
    (the meta device, without its random fills): for counting parameters and checking a
    checkpoint's shapes."""
    with torch.device("meta"), _NoRandomFill():
        yield


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


# CPU flags of the instructions that do bf16 arithmetic natively: AMX (Sapphire Rapids
# and later) and AVX-512 BF16 (Cooper Lake, Zen 4 and later). Without them bf16 matrix
# products are emulated and slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matrix products natively (so faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def pick_precision(name: str, device: torch.device) -> str:
    """`auto` -> "bf16" where `device` does bf16 natively, else "fp32"; `bf16` where it cannot is an error."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and device.type == "mps":
        raise ConfigError(["precision: bf16 autocast is not supported on mps; use fp32 or auto"])
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `precision` is "bf16"; a no-op context for "fp32"."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the large blocks PyTorch frees on a CPU, for reuse.

    By default glibc serves each allocation over its (dynamic) mmap threshold with a
    fresh mmap and returns it to the OS when freed, so every training step's large
    buffers (a ptb-small step's (700, 10000) logits, softmax and gradient; WikiText-2's
    33,278 x 300 embedding gradient) were new pages, each written for the first time
    through a page fault: on a 2-core Zen 4 EPYC that made the fused loss of a
    ptb-small step take 39 ms instead of 19 ms, and on a Zen 5 the `wikitext-2`
    recipe's bf16 step 62 ms instead of 39.5 (as jemalloc or tcmalloc would also fix).
    Now no block is mmapped (glibc caps the mmap threshold itself at 32 MiB, so a
    higher threshold would not reach WikiText-2's 40 MB buffers): every block comes
    from the heap, and up to 1 GiB of freed heap is kept rather than trimmed. Linux
    with glibc only; elsewhere (or if it fails) nothing changes. Returns whether set.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


class progress_bar:
    """A tqdm bar on stderr (shown only when `show` and stderr is a terminal) counting up
    to `total` (None: an open count, with its rate); calling it advances the bar."""

    def __init__(self, total: int | None, desc: str, show: bool = True, unit: str = "it"):
        self.total, self.desc, self.show, self.unit = total, desc, show, unit
        self.bar = None

    def __enter__(self):
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=self.desc,
                unit=self.unit,
                unit_scale=self.total is None,
                file=sys.stderr,
                disable=None,
                leave=False,
                dynamic_ncols=True,
            )
        return self

    def __call__(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
