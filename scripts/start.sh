#!/usr/bin/env bash
# The main job on the embedded default data, end to end:
#   install (pip's output in runs/setup.log) -> (no bundle yet: the quickstart trains the
#   SASRec-kind, the two-tower and, time allowing, the NextItNet-kind retriever, exports them
#   with a CTR head each into one bundle and prints their metrics beside popularity's and
#   the heads' effect) -> Redis (start one if none answers) -> serve on
#   http://127.0.0.1:${RECSERVE_PORT:-8000}, then show what to try.
# Quiet by default: the detail goes to log files under runs/; -v shows it all.
# Set RECSERVE_REBUILD=1 to train and export a fresh bundle even if one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
verbose=
for arg in "$@"; do
  case "$arg" in
    -v | --verbose) verbose=1 ;;
    *)
      echo "usage: bash scripts/start.sh [-v]" >&2
      exit 2
      ;;
  esac
done
mkdir -p runs
if [ -n "$verbose" ]; then
  bash scripts/setup.sh
elif ! bash scripts/setup.sh >runs/setup.log 2>&1; then
  tail -n 25 runs/setup.log >&2
  echo "error: the install failed; its whole output is in runs/setup.log" >&2
  exit 1
else
  echo "== .venv is installed (pip's output: runs/setup.log)"
fi
py=.venv/bin/python
export RECSERVE_MODELS_DIR=${RECSERVE_MODELS_DIR:-models}
port=${RECSERVE_PORT:-8000}
base=http://127.0.0.1:$port

if [ ! -f "$RECSERVE_MODELS_DIR/CURRENT" ] || [ -n "${RECSERVE_REBUILD:-}" ]; then
  echo "== training on the synthetic default data (detail: runs/quickstart/quickstart.log)"
  rm -rf runs/quickstart
  $py -m training ${verbose:+-v} quickstart --data synthetic --out runs/quickstart \
    --models-dir "$RECSERVE_MODELS_DIR" ${RECSERVE_EPOCHS:+--epochs "$RECSERVE_EPOCHS"} || {
    echo "error: the quickstart failed; its log is runs/quickstart/quickstart.log" >&2
    exit 1
  }
else
  echo "== serving the existing bundle $(cat "$RECSERVE_MODELS_DIR/CURRENT") (RECSERVE_REBUILD=1 rebuilds)"
fi

bash scripts/ensure-redis.sh

if [ -z "${RECSERVE_ADMIN_TOKEN:-}" ]; then
  token_file=runs/admin-token
  [ -s "$token_file" ] || $py -c "import secrets; print(secrets.token_urlsafe(24))" >"$token_file"
  chmod 600 "$token_file"
  RECSERVE_ADMIN_TOKEN=$(cat "$token_file")
  export RECSERVE_ADMIN_TOKEN
  token_where=runs/admin-token
else
  token_where=RECSERVE_ADMIN_TOKEN
fi

# service.serve: uvicorn with the HTTP limits of the settings (RECSERVE_MAX_HEADER_BYTES,
# RECSERVE_*_TIMEOUT_SECONDS, ...), as in the images; workers from RECSERVE_WORKERS. It runs
# in the background so that the screen can end with what to try once it is ready.
echo "== starting the service on $base (its log: runs/service.log)"
if [ -n "$verbose" ]; then
  $py -m service.serve --host 127.0.0.1 --port "$port" > >(tee runs/service.log) 2>&1 &
else
  $py -m service.serve --host 127.0.0.1 --port "$port" >runs/service.log 2>&1 &
fi
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM
ready() {
  $py -c "import urllib.request; urllib.request.urlopen('$base/readyz', timeout=2)" 2>/dev/null
}
until ready; do
  if ! kill -0 $server 2>/dev/null; then
    tail -n 25 runs/service.log >&2
    echo "error: the service stopped before it was ready; its log is runs/service.log" >&2
    exit 1
  fi
  sleep 0.5
done

history='[{"item_id": "1", "ts": 1700000000}, {"item_id": "2", "ts": 1700000600}]'
cat <<MSG

== recserve is ready: $base
   $base/demo/  the demo page
   $base/docs   the API, to try in the browser

   # top 5 after a history (SASRec-kind retriever, reranked by its CTR head)
   curl -s -X POST $base/recommend -H 'content-type: application/json' \\
        -d '{"history": $history, "k": 5}'
   # the same with the two-tower retriever
   curl -s -X POST $base/recommend -H 'content-type: application/json' \\
        -d '{"history": $history, "k": 5, "encoder": "two_tower"}'
   # record an event, then recommend from the stored history
   curl -s -X POST $base/events -H 'content-type: application/json' \\
        -d '{"user_id": "alice", "item_id": "3", "ts": 1700001200}'
   curl -s -X POST $base/recommend -H 'content-type: application/json' -d '{"user_id": "alice"}'
   # items like item 1
   curl -s '$base/items/1/similar?k=5'

   logs: runs/service.log (the service), runs/quickstart/quickstart.log (training),
         runs/setup.log (pip); metrics and table: runs/quickstart/summary.json
   admin token (POST /admin/reload): $token_where
   Ctrl-C stops the service; bash scripts/start.sh serves this bundle again.
MSG
wait $server
