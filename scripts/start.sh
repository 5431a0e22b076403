#!/usr/bin/env bash
# The main job on the embedded default data, end to end:
#   install -> (no bundle yet: generate the synthetic log, train the SASRec-kind encoder,
#   evaluate it against popularity, export a bundle) -> Redis (start one if none answers)
#   -> serve /recommend on http://127.0.0.1:${RECSERVE_PORT:-8000}.
# Set RECSERVE_REBUILD=1 to train and export a fresh bundle even if one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
export RECSERVE_MODELS_DIR=${RECSERVE_MODELS_DIR:-models}
port=${RECSERVE_PORT:-8000}

if [ ! -f "$RECSERVE_MODELS_DIR/CURRENT" ] || [ -n "${RECSERVE_REBUILD:-}" ]; then
  echo "== training on the synthetic default data"
  rm -rf runs/default
  $py -m training train --data synthetic --model sasrec --epochs "${RECSERVE_EPOCHS:-10}" \
    --out runs/default
  echo "== exporting the bundle"
  $py -m training export --data synthetic --checkpoint runs/default/checkpoint.pt \
    --models-dir "$RECSERVE_MODELS_DIR"
else
  echo "== serving the existing bundle $(cat "$RECSERVE_MODELS_DIR/CURRENT") (RECSERVE_REBUILD=1 rebuilds)"
fi

bash scripts/ensure-redis.sh

if [ -z "${RECSERVE_ADMIN_TOKEN:-}" ]; then
  token_file=runs/admin-token
  mkdir -p runs
  [ -s "$token_file" ] || $py -c "import secrets; print(secrets.token_urlsafe(24))" >"$token_file"
  chmod 600 "$token_file"
  RECSERVE_ADMIN_TOKEN=$(cat "$token_file")
  export RECSERVE_ADMIN_TOKEN
fi

cat <<MSG
== recserve on http://127.0.0.1:$port   (API docs: http://127.0.0.1:$port/docs)
   curl -s -X POST http://127.0.0.1:$port/recommend -H 'content-type: application/json' \\
        -d '{"history": [{"item_id": "1", "ts": 1700000000}, {"item_id": "2", "ts": 1700000600}], "k": 5}'
   curl -s -X POST http://127.0.0.1:$port/events -H 'content-type: application/json' \\
        -d '{"user_id": "alice", "item_id": "3", "ts": 1700001200}'
   curl -s -X POST http://127.0.0.1:$port/recommend -H 'content-type: application/json' -d '{"user_id": "alice"}'
   admin token (POST /admin/reload): in runs/admin-token unless RECSERVE_ADMIN_TOKEN is set
MSG
# service.serve: uvicorn with the HTTP limits of the settings (RECSERVE_MAX_HEADER_BYTES,
# RECSERVE_*_TIMEOUT_SECONDS, ...), as in the images; workers from RECSERVE_WORKERS.
exec $py -m service.serve --host 127.0.0.1 --port "$port"
