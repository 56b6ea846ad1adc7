#!/usr/bin/env bash
# GPU checks for lstm-lm, in order of importance, each part under a time cap so that one
# slow part cannot starve the rest (about 10 minutes in all, 13 with --more):
#   1. the suite's CUDA tests: every registered cell (lstm_lm/cells/) custom vs cuDNN on CUDA, the flat
#      weight buffer read in place by cuDNN (no copy warning), no host sync in a training step,
#      fp32 and bf16 training of each cell, the fused loss (tests/test_gpu.py, test_model.py, test_loss.py);
#   2. the speed benchmark on CUDA (bench_speed.py --quick): in-process rows (cuDNN and the
#      hand-written cell, fp32 and bf16, fused and plain loss, compiled, CUDA graphs) and, when
#      ../shared/peer and ../shared/data are there, the upstream word_language_model example
#      beside lstm-lm train (bf16, fp32, compiled hand-written cell) at ptb-small, -medium, -large;
#   3. scale on CUDA (bench_scale.py): the full against the adaptive softmax at 250k words,
#      and the wikitext-103 recipe as its config gives it (compiled), with its epoch time;
#   4. one epoch of ptb-small on CUDA with cuDNN, then eval and complete;
#   5. 300 steps of ptb-small under DistributedDataParallel (torchrun, one process, NCCL)
#      against the plain run;
#   6. the first two epochs of ptb-awd (AWD-LSTM's regularization on cuDNN);
#   with --more: 7. the long-range experiment (every cell) on CUDA, at its default
#   budget; 8. one epoch of ptb-small with the hand-written cell.
#
#   scripts/gpu_check.sh [--out DIR] [--data PTB_DIR] [--python PYTHON] [--more]
#
# Writes into DIR: env.txt, pytest.log, bench_gpu.json with its table in bench_gpu.log,
# scale_gpu.json with its table in scale_gpu.log,
# ddp-check.json (the largest difference of a step's loss between the two runs),
# ptb-small-cudnn.json and ptb-small-custom.json (each the `lstm-lm train` summary plus the
# per-epoch metrics), eval.jsonl (`lstm-lm eval` of each run on CUDA), ptb-awd-2-epochs.json,
# long-range.json and parts.txt (each part's exit status and seconds; 124 = over its cap).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=gpu-check
DATA=../shared/data/ptb
PY=python3
MORE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --more) MORE=1; shift ;;
    *) echo "usage: scripts/gpu_check.sh [--out DIR] [--data PTB_DIR] [--python PYTHON] [--more]" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
runs=$(mktemp -d)

# part NAME CAP_SECONDS COMMAND...: run it under `timeout`, note its status and time.
part() {
  local name=$1 cap=$2; shift 2
  echo "== $name (at most ${cap}s)" >&2
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  echo "$name rc=$rc ${SECONDS}s-total $((SECONDS - t0))s" | tee -a "$OUT/parts.txt" >&2
  [ "$rc" -eq 0 ] || status=1
}

# summarize SUMMARY_JSON METRICS_JSONL: the train summary with its per-epoch metrics.
summarize() {
  "$PY" - "$1" "$2" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
summary["metrics"] = [json.loads(line) for line in open(sys.argv[2])]
print(json.dumps(summary, indent=2))
PY
}

{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  2>&1 | tee "$OUT/env.txt"

tests() {
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py tests/test_loss.py 2>&1 | tee "$OUT/pytest.log"
  return "${PIPESTATUS[0]}"
}

have_ptb=0
[ -f "$DATA/train.txt" ] && have_ptb=1
[ "$have_ptb" = 1 ] || echo "no PTB at $DATA: skipping the ptb-small, ptb-awd and DDP runs (pass --data DIR)" >&2

ddp_check() {
  for how in plain ddp; do
    launcher=("$PY" -m lstm_lm)
    [ "$how" = ddp ] && launcher=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m lstm_lm)
    "${launcher[@]}" train --config configs/ptb-small.yaml --data "$DATA" --device cuda --max-steps 300 \
      --precision fp32 --set model.dropout=0 --set train.log_interval=1 --out "$runs/ddp-$how" > /dev/null || return 1
  done
  "$PY" - "$runs/ddp-plain/steps.jsonl" "$runs/ddp-ddp/steps.jsonl" <<'PY' | tee "$OUT/ddp-check.json"
import json, sys
plain, ddp = ([json.loads(line)["loss"] for line in open(path)] for path in sys.argv[1:3])
print(json.dumps({"steps": [len(plain), len(ddp)],
                  "max_abs_loss_difference": max(abs(a - b) for a, b in zip(plain, ddp))}))
PY
}

ptb_small() {  # ptb_small IMPL: one epoch, then eval and complete on CUDA
  local impl=$1
  "$PY" -m lstm_lm train --config configs/ptb-small.yaml --data "$DATA" --epochs 1 --impl "$impl" --device cuda \
    --out "$runs/ptb-small-$impl" > "$runs/summary-$impl.json" || return 1
  summarize "$runs/summary-$impl.json" "$runs/ptb-small-$impl/metrics.jsonl" | tee "$OUT/ptb-small-$impl.json"
  "$PY" -m lstm_lm eval --checkpoint "$runs/ptb-small-$impl" --device cuda | tee -a "$OUT/eval.jsonl" || return 1
  "$PY" -m lstm_lm complete "the company said" --checkpoint "$runs/ptb-small-$impl" --device cuda
}

bench() {  # one round against the peer: a GPU of its own does not drift as the shared CPU does
  "$PY" scripts/bench_speed.py --quick --device cuda --peer-rounds 1 --peer-batches 300 --peer-interval 50 \
    --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
  return "${PIPESTATUS[0]}"
}

scale() {
  "$PY" scripts/bench_scale.py --device cuda --sizes none --vocabs 250k --recipes wikitext-103 --steps 20 \
    --rounds 2 --json "$OUT/scale_gpu.json" 2>&1 | tee "$OUT/scale_gpu.log"
  return "${PIPESTATUS[0]}"
}

awd() {
  "$PY" -m lstm_lm train --config configs/ptb-awd.yaml --data "$DATA" --epochs 2 --device cuda \
    --out "$runs/ptb-awd" > "$runs/awd-summary.json" || return 1
  summarize "$runs/awd-summary.json" "$runs/ptb-awd/metrics.jsonl" | tee "$OUT/ptb-awd-2-epochs.json"
}

long_range() {
  "$PY" -m lstm_lm experiment long-range --device cuda --out "$runs/long-range" || return 1
  cp "$runs/long-range/results.json" "$OUT/long-range.json"
}

export -f summarize tests ddp_check ptb_small bench scale awd long_range
export PY DATA OUT runs
part "CUDA tests" 90 bash -c tests
part "speed benchmark on CUDA" 230 bash -c bench
part "scale on CUDA: adaptive softmax, wikitext-103 recipe" 90 bash -c scale
if [ "$have_ptb" = 1 ]; then
  part "ptb-small, 1 epoch, cuDNN" 60 bash -c "ptb_small cudnn"
  part "DDP (torchrun, 1 process, NCCL) vs plain, ptb-small 300 steps" 60 bash -c ddp_check
  part "ptb-awd, first 2 epochs" 60 bash -c awd
fi
if [ "$MORE" = 1 ]; then
  part "long-range experiment on CUDA" 100 bash -c long_range
  [ "$have_ptb" = 1 ] && part "ptb-small, 1 epoch, hand-written cell" 60 bash -c "ptb_small custom"
fi
cat "$OUT/parts.txt" >&2
exit $status
