#!/usr/bin/env bash
# Train a recipe on Penn Treebank and print its final validation and test perplexity
# and wall time as one JSON line on stdout (the training log goes to stderr).
#
#   scripts/reproduce_ptb.sh configs/ptb-cpu-30min.yaml                  # ../shared/data/ptb
#   scripts/reproduce_ptb.sh configs/ptb-small.yaml path/to/ptb --device cuda
#   scripts/reproduce_ptb.sh configs/shakespeare-char.yaml ../shared/data/tinyshakespeare/input.txt
#
# Arguments: CONFIG, then the corpus (default ../shared/data/ptb; any --data value
# works), then any further `lstm-lm train` options. The run goes to runs/NAME, NAME
# being the config's file name (--out DIR overrides). Sets up .venv where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ))
fi
config=$1
data=${2:-../shared/data/ptb}
shift $(( $# >= 2 ? 2 : 1 ))
if [[ ! -f "$config" ]]; then
    echo "error: no config file $config" >&2
    exit 1
fi
if [[ ! -e "$data" ]]; then
    echo "error: no corpus at $data (give the PTB directory as the second argument)" >&2
    exit 1
fi

[ -x .venv/bin/lstm-lm ] || bash scripts/setup.sh >&2
name=$(basename "$config" .yaml)
started=$(date +%s.%N)
summary=$(.venv/bin/lstm-lm train --config "$config" --data "$data" --out "runs/$name" "$@")
ended=$(date +%s.%N)

SUMMARY=$summary CONFIG=$config STARTED=$started ENDED=$ended .venv/bin/python - <<'PY'
import json, math, os, platform

import torch

s = json.loads(os.environ["SUMMARY"])
cfg = json.load(open(os.path.join(s["best_checkpoint"], "config.json")))
if torch.cuda.is_available() and cfg["train"]["device"] != "cpu":
    machine = torch.cuda.get_device_name()
else:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    machine = f"{model}, {os.cpu_count()} cores"
out = {
    "config": os.environ["CONFIG"],
    "valid_perplexity": s["best_valid_perplexity"],
    "test_perplexity": s["test_perplexity"],
    "test_top1_accuracy": s.get("test_top1_accuracy"),
    "test_top5_accuracy": s.get("test_top5_accuracy"),
    "wall_s": round(float(os.environ["ENDED"]) - float(os.environ["STARTED"]), 1),
    "train_wall_s": s["wall_s"],
    "epochs": s["epochs"],
    "steps": s["steps"],
    "machine": machine,
    "torch": torch.__version__,
}
if cfg["data"]["tokenizer"] == "char":
    out["valid_bits_per_char"] = s["best_valid_loss"] / math.log(2)
    out["test_bits_per_char"] = s["test_loss"] / math.log(2) if s["test_loss"] is not None else None
print(json.dumps(out))
PY
