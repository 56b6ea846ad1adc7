"""torch.nn.LSTM's kernel alone (oneDNN on a CPU), forward and backward, fp32 against bf16.

    .venv/bin/python scripts/bench_rnn_kernel.py                    # 200 to 1500 units
    .venv/bin/python scripts/bench_rnn_kernel.py --units 650 --rounds 3
    .venv/bin/python scripts/bench_rnn_kernel.py --units 1000 --proj 128 --layers 1   # ptb-cpu-30min's

Answers one question: at which widths does bf16 autocast make the recurrent kernel
faster on this machine? A ptb-size chunk (2 layers, 35 steps of batch 20) runs
forward under autocast, then backward of a float32 sum of its output. Each width
and precision is timed in interleaved rounds, a round's figure being the median of
--repeats passes, and the best round is reported.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from lstm_lm.utils import native_bf16


def time_once(lstm: torch.nn.LSTM, x: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """Seconds for one forward and one backward."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, _ = lstm(x)
    t1 = time.perf_counter()
    out.float().sum().backward()
    return t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, nargs="+", default=[200, 400, 650, 1000, 1500])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--proj",
        type=int,
        default=0,
        help="an LSTMP: project h to this many units (0: none); PyTorch's own kernel runs it, not oneDNN",
    )
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per round; the median counts")
    args = ap.parse_args(argv)
    if not native_bf16(torch.device("cpu")):
        raise SystemExit("error: this CPU has no bf16 instructions, and oneDNN's recurrent kernels refuse bf16 here")
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")  # said in --help
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per chunk, best round")
    print(f"{'units':>6}  {'fp32 fwd':>9} {'fp32 bwd':>9}  {'bf16 fwd':>9} {'bf16 bwd':>9}  bf16/fp32 total")
    for units in args.units:
        inputs = args.proj or units
        lstm = torch.nn.LSTM(inputs, units, args.layers, proj_size=args.proj)
        x = torch.randn(args.bptt, args.batch, inputs, requires_grad=True)
        best = {False: (float("inf"), float("inf")), True: (float("inf"), float("inf"))}
        for bf16 in (False, True):  # warm-up: oneDNN builds its primitives on the first call
            time_once(lstm, x, bf16)
        for _ in range(args.rounds):
            for bf16 in (False, True):
                runs = sorted((time_once(lstm, x, bf16) for _ in range(args.repeats)), key=sum)
                median = runs[len(runs) // 2]
                if sum(median) < sum(best[bf16]):
                    best[bf16] = median
        (f32f, f32b), (bff, bfb) = best[False], best[True]
        print(
            f"{units:>6}  {f32f * 1e3:9.1f} {f32b * 1e3:9.1f}  {bff * 1e3:9.1f} {bfb * 1e3:9.1f}  "
            f"{(bff + bfb) / (f32f + f32b):.2f}"
        )


if __name__ == "__main__":
    main()
