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
# nemo-toolkit (about 3 GB, the engine) comes with the package; the test extras add the
# oracles' transformers/detoxify and lm-evaluation-harness
.venv/bin/python -m pip install -q -e ".[test]"
# nemo-toolkit pulls a torchvision built for CUDA, which fails to import next to the CPU torch
# ("operator torchvision::nms does not exist"); nothing here needs torchvision
.venv/bin/python -m pip uninstall -q -y torchvision 2>/dev/null || true
.venv/bin/python - <<'PY'
import torch, megatron.core, importlib.metadata as md
print(f"nemo-acft env: torch {torch.__version__}, megatron-core {md.version('megatron-core')}, "
      f"nemo-toolkit {md.version('nemo-toolkit')}, cuda available: {torch.cuda.is_available()}")
PY
# A real Slurm for tests/test_slurm.py (Debian's slurm-wlm and munge, about a minute), when this
# runs as root on Debian/Ubuntu and it is missing; ACFT_NO_SLURM=1 skips it (the Slurm tests
# are then skipped).
if [ "${ACFT_NO_SLURM:-0}" != 1 ] && ! command -v slurmctld >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing slurm-wlm and munge (apt-get) for the Slurm tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
