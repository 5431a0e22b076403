#!/bin/sh
# One-shot export job for docker compose: build a bundle on the embedded default data
# into /models unless one is already there (CURRENT exists).
set -eu
if [ -f /models/CURRENT ]; then
  echo "bundle $(cat /models/CURRENT) present; nothing to do"
  exit 0
fi
python -m training train --data "${RECSERVE_EXPORT_DATA:-synthetic}" --model sasrec \
  --epochs "${RECSERVE_EPOCHS:-10}" --out /tmp/run
python -m training export --data "${RECSERVE_EXPORT_DATA:-synthetic}" \
  --checkpoint /tmp/run/checkpoint.pt --models-dir /models
