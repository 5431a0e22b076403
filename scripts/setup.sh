#!/usr/bin/env bash
# Create .venv and install recserve with the extras this machine can use.
# Idempotent: a stamp of pyproject.toml and this script skips a repeat install.
# Without an NVIDIA GPU it installs the CPU build of torch (torch==2.13.0) and the cpu
# extra, so no CUDA package is downloaded; with one, the gpu extra.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.recserve-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  accel=gpu
  pip install torch
else
  accel=cpu
  # A plain "torch" requirement resolves to a multi-GB CUDA build on Linux.
  pip install "torch==2.13.0" ${RECSERVE_TORCH_INDEX:+--index-url "$RECSERVE_TORCH_INDEX"}
fi
pip install -e ".[train,serve,$accel,ray,dev]"
echo "$want" >"$stamp"
echo "recserve installed in .venv ($accel)"
