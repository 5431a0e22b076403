#!/bin/sh
# One-shot export job for docker compose: build a bundle on the embedded default data
# into /models unless one is already there (CURRENT exists).
set -eu
if [ -f /models/CURRENT ]; then
  echo "bundle $(cat /models/CURRENT) present; nothing to do"
  exit 0
fi
# The same bundle as scripts/start.sh builds: every retriever that fits the quickstart's
# budget, a CTR head each (training/quickstart.py).
python -m training quickstart --data "${RECSERVE_EXPORT_DATA:-synthetic}" \
  --out /tmp/quickstart --models-dir /models ${RECSERVE_EPOCHS:+--epochs "$RECSERVE_EPOCHS"}
