#!/usr/bin/env bash
# Set up lstm-lm in a virtual environment, .venv, at the repository root.
#
#   bash scripts/setup.sh           # lstm-lm, what it needs, matplotlib for its pictures ([plot]),
#                                   # FastAPI and uvicorn for `lstm-lm serve` ([serve]), onnx and
#                                   # onnxruntime for `lstm-lm export` ([export])
#   bash scripts/setup.sh --test    # ... plus pytest, httpx, selenium and ruff ([test]), and --web where npm
#                                   # is found; the browser tests also need Debian's chromium and
#                                   # chromium-driver (.ci/run installs them)
#   bash scripts/setup.sh --web     # ... plus onnxruntime-web for `lstm-lm export --format web`: npm ci in
#                                   # js/, the versions pinned by js/package-lock.json (needs Node and npm)
#
# torch is installed first and pinned to 2.13.0 when it is missing: pyproject.toml asks
# only for torch>=2.4, and an open range with no torch installed pulls a multi-GB CUDA
# build. Set PYTHON to choose the interpreter (default: python3, 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
extras="[plot,serve,export]"
web=no
for arg in "$@"; do
  case "$arg" in
    --test) extras="[plot,serve,export,test]"; [ "$web" = yes ] || web=if-npm ;;
    --web) web=yes ;;
    *) echo "usage: bash scripts/setup.sh [--test] [--web]" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0" >&2
  "${pip[@]}" torch==2.13.0
fi
echo "setup: installing lstm-lm$extras and its dependencies" >&2
"${pip[@]}" --editable ".$extras"
if [ "$web" = yes ] || { [ "$web" = if-npm ] && command -v npm >/dev/null; }; then
  if ! command -v npm >/dev/null; then
    echo "setup: --web needs Node.js and npm (https://nodejs.org, or apt-get install npm)" >&2
    exit 1
  fi
  echo "setup: installing onnxruntime-web into js/node_modules (npm ci)" >&2
  npm ci --prefix js --no-audit --no-fund --loglevel=error >&2
elif [ "$web" = if-npm ]; then
  echo "setup: npm not found, so the web export's tests will skip (bash scripts/setup.sh --web needs it)" >&2
fi
echo "setup: done; run 'source .venv/bin/activate' to use lstm-lm directly" >&2
