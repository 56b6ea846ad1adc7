#!/usr/bin/env bash
# The figures of docs/results.md ("The LSTM's relatives"), docs/why-lstm.md and docs/speed.md
# for the cells, one after another on an otherwise idle machine (about 75 minutes on a 2-core CPU):
#   bash scripts/measure_cells.sh [OUT]       # default runs/measure-cells
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/measure-cells}
mkdir -p "$out"
py=.venv/bin/python
grep -m1 "model name" /proc/cpuinfo | tee "$out/machine.txt"
echo "amx: $(grep -c amx_bf16 /proc/cpuinfo), avx512_bf16: $(grep -c avx512_bf16 /proc/cpuinfo)" | tee -a "$out/machine.txt"
$py scripts/ptb_cells.py --minutes "${PTB_MINUTES:-10}" --out "$out/ptb" > "$out/ptb.md" 2> "$out/ptb.log"
$py -m lstm_lm experiment long-range --out "$out/long-range" > "$out/long-range.txt" 2> "$out/long-range.log"
$py scripts/bench_cells.py --baseline "${BASELINE:-e7482a4}" --json "$out/bench_cells.json" > "$out/bench_cells.md" 2> "$out/bench_cells.log"
$py scripts/bench_speed.py --quick --no-peer --skip-complete --gen-tokens 0 --sizes small --json "$out/bench_speed.json" 2> "$out/bench_speed.log"
echo "done: $out" >&2
