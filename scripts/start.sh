#!/usr/bin/env bash
# The main job on the embedded default data: install, generate the synthetic log,
# train the SASRec-kind encoder, evaluate it against popularity and print the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m training train --data synthetic --model sasrec \
  --epochs "${RECSERVE_EPOCHS:-10}" --out runs/default "$@"
