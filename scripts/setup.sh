#!/usr/bin/env bash
# Create (or reuse) the pinned CPU environment in .venv and install nemo-acft into it.
# Idempotent: a second run only checks the pins. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_CONSTRAINT="$PWD/constraints/cpu.txt"
# torch first, from the constraint (the local CPU wheel), so nothing later can pull a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0+cpu
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python - <<'PY'
import torch, megatron.core, importlib.metadata as md
print(f"nemo-acft env: torch {torch.__version__}, megatron-core {md.version('megatron-core')}, "
      f"cuda available: {torch.cuda.is_available()}")
PY
