#!/usr/bin/env bash
# GPU checks for lstm-lm: the suite's CUDA tests (custom vs cuDNN equivalence, fp32 and
# bf16 training), the speed benchmark on CUDA, one epoch of ptb-small on CUDA with
# each engine, the first two epochs of ptb-awd, and 300 steps of ptb-small under
# DistributedDataParallel (torchrun, one process, NCCL) against the plain run.
# About 8 minutes on an H100.
#
#   scripts/gpu_check.sh [--out DIR] [--data PTB_DIR] [--python PYTHON]
#
# Writes into DIR: env.txt, pytest.log, bench_gpu.json (scripts/bench_speed.py --quick
# --device cuda) with its table in bench_gpu.log, ptb-small-cudnn.json and
# ptb-small-custom.json (each the `lstm-lm train` summary plus the per-epoch metrics)
# eval.jsonl (`lstm-lm eval` of each run on CUDA), ptb-awd-2-epochs.json and
# ddp-check.json (the largest difference of a step's loss between the two runs).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=gpu-check
DATA=../shared/data/ptb
PY=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    *) echo "usage: scripts/gpu_check.sh [--out DIR] [--data PTB_DIR] [--python PYTHON]" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  2>&1 | tee "$OUT/env.txt"

echo "== CUDA tests" >&2
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py tests/test_loss.py 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== speed benchmark on CUDA (ptb-small, ptb-medium, ptb-large)" >&2
"$PY" scripts/bench_speed.py --quick --device cuda --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -f "$DATA/train.txt" ]; then
  runs=$(mktemp -d)
  for impl in cudnn custom; do
    echo "== ptb-small, 1 epoch, impl $impl, CUDA" >&2
    if "$PY" -m lstm_lm train --config configs/ptb-small.yaml --data "$DATA" --epochs 1 \
         --impl "$impl" --device cuda --out "$runs/ptb-small-$impl" > "$runs/summary.json"; then
      "$PY" - "$runs/summary.json" "$runs/ptb-small-$impl/metrics.jsonl" > "$OUT/ptb-small-$impl.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
summary["metrics"] = [json.loads(line) for line in open(sys.argv[2])]
print(json.dumps(summary, indent=2))
PY
      cat "$OUT/ptb-small-$impl.json"
      echo "== eval and complete on CUDA ($impl)" >&2
      "$PY" -m lstm_lm eval --checkpoint "$runs/ptb-small-$impl" --device cuda | tee -a "$OUT/eval.jsonl" || status=1
      "$PY" -m lstm_lm complete "the company said" --checkpoint "$runs/ptb-small-$impl" --device cuda || status=1
    else
      status=1
    fi
  done
  echo "== ptb-awd, first 2 epochs, CUDA (AWD-LSTM's regularization on cuDNN)" >&2
  if "$PY" -m lstm_lm train --config configs/ptb-awd.yaml --data "$DATA" --epochs 2 --device cuda \
       --out "$runs/ptb-awd" > "$runs/awd-summary.json"; then
    "$PY" - "$runs/awd-summary.json" "$runs/ptb-awd/metrics.jsonl" > "$OUT/ptb-awd-2-epochs.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
summary["metrics"] = [json.loads(line) for line in open(sys.argv[2])]
print(json.dumps(summary, indent=2))
PY
    cat "$OUT/ptb-awd-2-epochs.json"
  else
    status=1
  fi
  echo "== DistributedDataParallel with one process on CUDA (NCCL) against the plain run, ptb-small, 300 steps" >&2
  for how in plain ddp; do
    launcher=("$PY" -m lstm_lm)
    [ "$how" = ddp ] && launcher=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m lstm_lm)
    "${launcher[@]}" train --config configs/ptb-small.yaml --data "$DATA" --device cuda --max-steps 300 \
      --precision fp32 --set model.dropout=0 --set train.log_interval=1 --out "$runs/ddp-$how" > /dev/null || status=1
  done
  "$PY" - "$runs/ddp-plain/steps.jsonl" "$runs/ddp-ddp/steps.jsonl" <<'PY' | tee "$OUT/ddp-check.json" || status=1
import json, sys
plain, ddp = ([json.loads(line)["loss"] for line in open(path)] for path in sys.argv[1:3])
print(json.dumps({"steps": [len(plain), len(ddp)],
                  "max_abs_loss_difference": max(abs(a - b) for a, b in zip(plain, ddp))}))
PY
else
  echo "no PTB at $DATA: skipping the ptb-small, ptb-awd and DDP runs (pass --data DIR)" >&2
fi
exit $status
