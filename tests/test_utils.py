"""Device and precision choice: CPU flags decide whether `auto` means bf16."""

import contextlib
import subprocess
import sys

import pytest
import torch

import lstm_lm.utils as utils
from lstm_lm.errors import ConfigError


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert utils.cpu_flags.__wrapped__(str(info)) >= {"avx512_bf16", "avx512f", "amx_tile"}
    assert utils.cpu_flags.__wrapped__(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx512f", "avx512_bf16"}, "bf16"),  # Cooper Lake, Zen 4 and later
        ({"amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids and later
        ({"avx2", "avx512f"}, "fp32"),  # bf16 would be emulated: slower than float32
        (set(), "fp32"),  # not Linux, or no flags
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_does_it_natively(monkeypatch, flags, expected):
    monkeypatch.setattr(utils, "cpu_flags", lambda: frozenset(flags))
    assert utils.pick_precision("auto", torch.device("cpu")) == expected
    assert utils.pick_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice is kept
    assert utils.pick_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_is_fp32_on_mps_and_bf16_there_is_refused():
    assert utils.pick_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(ConfigError, match="mps"):
        utils.pick_precision("bf16", torch.device("mps"))


def test_autocast_is_bf16_for_bf16_and_nothing_for_fp32():
    a = torch.randn(4, 4)
    with utils.autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    ctx = utils.autocast(torch.device("cpu"), "fp32")
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert (a @ a).dtype == torch.float32


def test_freed_memory_is_kept_for_reuse_where_glibc_allows():
    import platform

    from lstm_lm.utils import keep_freed_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc and keep_freed_memory() is glibc  # set once, cached


def test_buffers_above_32_mib_freed_each_step_are_reused_without_page_faults():
    """A step that allocates 64 and 48 MiB buffers and frees them: glibc would mmap them
    afresh at each step and fault in each of their pages once more (28,672 pages of 4
    KiB); kept on the heap, the steps after the first few write them without a fault.
    In a fresh process, so that no earlier test's allocations count."""
    import platform

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc's malloc only")
    code = (
        "import resource, torch\n"
        "from lstm_lm.utils import keep_freed_memory\n"
        "assert keep_freed_memory()\n"
        "for step in range(6):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    a, b = torch.ones(16 << 20), torch.ones(12 << 20)\n"
        "    del a, b\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    faults = [int(n) for n in done.stdout.split()]
    assert faults[0] > 20_000 and all(n < 100 for n in faults[-3:]), faults
