"""Batch-1 next-word latency on the CPU: onnxruntime (fp32 and int8) against PyTorch.

    python scripts/bench_onnx.py --checkpoint runs/demo --checkpoint runs/ptb-small

For each checkpoint: exports it (fp32 and int8) into a temporary folder, then times,
in interleaved rounds so that the machine's drift falls on every row alike,
  prompt  reading a 12-token prompt from an empty state and scoring the next token
  step    one more token with the state carried (what each new word costs)
for PyTorch (the fused kernel, fp32, as LanguageModel.session reads) and for the
ONNX graph in onnxruntime. Prints the median of each row in ms and its ratio to PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lstm_lm import LanguageModel
from lstm_lm.inference.export import export_onnx, ort_session, run_chunk, state_names, state_sizes


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200, help="Calls per row per round.")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for checkpoint in args.checkpoint:
        lm = LanguageModel.load(checkpoint)
        names = state_names(lm.model)
        ids = np.array([1] + [int(i) % lm.vocab_size for i in range(5, 5 + 11 * 7, 7)])[:, None]  # (12, 1)
        with tempfile.TemporaryDirectory() as tmp:
            sessions = {}
            for label, int8 in (("onnx fp32", False), ("onnx int8", True)):
                path = Path(tmp) / f"{label.split()[1]}.onnx"
                export_onnx(lm, path, int8=int8, data=str(Path(tmp) / "none"))
                sessions[label] = ort_session(path)
            zero = [np.zeros((1, size), np.float32) for size in state_sizes(lm.model)]
            x, one = torch.from_numpy(ids), torch.tensor([[3]])

            @torch.no_grad()
            def torch_prompt():
                return lm.model(x)

            with torch.no_grad():
                _, state = lm.model(x)

            @torch.no_grad()
            def torch_step():
                return lm.model(one, state)

            _, onnx_state = run_chunk(sessions["onnx fp32"], names, ids, zero)
            rows = {("pytorch fp32", "prompt"): torch_prompt, ("pytorch fp32", "step"): torch_step}
            for label, s in sessions.items():
                _, st = run_chunk(s, names, ids, zero)
                rows[(label, "prompt")] = lambda s=s: run_chunk(s, names, ids, zero)
                rows[(label, "step")] = lambda s=s, st=st: run_chunk(s, names, np.array([[3]]), st)
            for fn in rows.values():
                timed(fn, 20)  # warm-up
            results = {key: [] for key in rows}
            for _ in range(args.rounds):
                for key, fn in rows.items():
                    results[key].append(timed(fn, args.calls))
        print(
            f"{checkpoint}: batch 1, CPU, {torch.get_num_threads()} threads, median of {args.rounds} rounds "
            f"of {args.calls} calls"
        )
        for what in ("prompt", "step"):
            base = statistics.median(results[("pytorch fp32", what)])
            for label in ("pytorch fp32", "onnx fp32", "onnx int8"):
                ms = statistics.median(results[(label, what)])
                print(f"  {what:<7} {label:<13} {ms:8.3f} ms   {base / ms:5.2f}x PyTorch's speed")


if __name__ == "__main__":
    main()
