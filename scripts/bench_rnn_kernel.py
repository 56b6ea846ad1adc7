"""torch.nn.LSTM's kernel alone (oneDNN on a CPU), forward and backward, fp32 against bf16,
or for an LSTMP, ATen's kernel against lstm-lm's (lstm_lm/cells/lstmp_kernel.py) in fp32.

    .venv/bin/python scripts/bench_rnn_kernel.py                    # 200 to 1500 units
    .venv/bin/python scripts/bench_rnn_kernel.py --units 650 --rounds 3
    .venv/bin/python scripts/bench_rnn_kernel.py --units 1000 --proj 128 --layers 1   # ptb-cpu-30min's
    .venv/bin/python scripts/bench_rnn_kernel.py --compare lstmp --units 1000 --proj 128 --layers 1

Answers one of two questions. `--compare precision` (the default): at which widths
does bf16 autocast make the recurrent kernel faster on this machine? `--compare
lstmp`: how much faster is lstm-lm's LSTMP kernel, the one float32 training runs,
than torch.lstm's? A ptb-size chunk (2 layers, 35 steps of batch 20) runs forward,
then backward of a float32 sum of its output. Each width and side is timed in
interleaved rounds, a round's figure being the median of --repeats passes, and the
best round is reported.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch

from lstm_lm.cells.lstmp_kernel import lstmp
from lstm_lm.utils import native_bf16


def time_once(forward: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """Seconds for one forward and one backward."""
    t0 = time.perf_counter()
    out = forward()
    t1 = time.perf_counter()
    out.float().sum().backward()
    return t1 - t0, time.perf_counter() - t1


def sides(lstm: torch.nn.LSTM, x: torch.Tensor, compare: str) -> dict[str, Callable[[], torch.Tensor]]:
    """The two forwards to time, baseline first."""
    if compare == "precision":

        def run(bf16: bool) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return lstm(x)[0]

        return {"fp32": lambda: run(False), "bf16": lambda: run(True)}
    shape = (lstm.num_layers, x.size(1))
    state = (x.new_zeros(*shape, lstm.proj_size), x.new_zeros(*shape, lstm.hidden_size))
    weights = [w for layer in lstm.all_weights for w in layer]  # W_ih, W_hh, b_ih, b_hh, W_hr per layer
    return {
        "aten": lambda: lstm(x, state)[0],
        "ours": lambda: lstmp(x, state, weights, lstm.num_layers, 0.0, True)[0],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=("precision", "lstmp"), default="precision", help="see above")
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
    if args.compare == "precision" and not native_bf16(torch.device("cpu")):
        raise SystemExit("error: this CPU has no bf16 instructions, and oneDNN's recurrent kernels refuse bf16 here")
    if args.compare == "lstmp" and not args.proj:
        raise SystemExit("error: --compare lstmp times an LSTMP: give its --proj")
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")  # said in --help
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per chunk, best round")
    a, b = ("fp32", "bf16") if args.compare == "precision" else ("aten", "ours")
    print(f"{'units':>6}  {a + ' fwd':>9} {a + ' bwd':>9}  {b + ' fwd':>9} {b + ' bwd':>9}  {b}/{a} total")
    for units in args.units:
        inputs = args.proj or units
        lstm = torch.nn.LSTM(inputs, units, args.layers, proj_size=args.proj)
        x = torch.randn(args.bptt, args.batch, inputs, requires_grad=True)
        forwards = sides(lstm, x, args.compare)
        best = {name: (float("inf"), float("inf")) for name in forwards}
        for forward in forwards.values():  # warm-up: oneDNN builds its primitives on the first call
            time_once(forward)
        for _ in range(args.rounds):
            for name, forward in forwards.items():
                runs = sorted((time_once(forward) for _ in range(args.repeats)), key=sum)
                median = runs[len(runs) // 2]
                if sum(median) < sum(best[name]):
                    best[name] = median
        (af, ab), (bf, bb) = best.values()
        times = f"{af * 1e3:9.1f} {ab * 1e3:9.1f}  {bf * 1e3:9.1f} {bb * 1e3:9.1f}"
        print(f"{units:>6}  {times}  {(bf + bb) / (af + ab):.2f}")


if __name__ == "__main__":
    main()
