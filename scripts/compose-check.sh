#!/usr/bin/env bash
# docker-compose.yml built and run for real with podman, then torn down:
#   build recserve:serve-cpu and recserve:train-cpu (docker/Dockerfile) -> docker-compose up
#   against podman's API socket (a project of its own, the service published on a free
#   127.0.0.1 port) -> wait for /readyz -> the serve container's promises (no torch, uid
#   10001, read-only root, healthy) -> /events, /recommend (stored history = the same history
#   sent in the request) -> /admin/reload with the admin token -> restart the service
#   container -> the same user's /recommend again, from the history kept in Redis -> down -v.
# Exits non-zero with a "compose-check: FAIL" line on any failure; everything it created
# (containers, the models volume, the network, the API socket) is removed either way. The
# images stay, so the next run's build is a warm one.
#
# Needs podman and docker-compose (podman-compose before 1.3 ignores depends_on conditions,
# and later ones do so on podman < 4.6). Environment:
#   RECSERVE_COMPOSE_LOCAL  auto (default), 1 or 0. 1: the local stand-ins of docker/local/
#                           (base images built from Debian packages, runc and the rlimits this
#                           host allows, a healthcheck loop for podman without systemd);
#                           auto: 1 when python:3.11-slim is neither present nor pullable.
#   RECSERVE_TORCH_WHEEL    a CPU torch wheel for the train image, for where
#                           download.pytorch.org cannot be reached (default there: the
#                           torch-*+cpu-cp311 wheel in /opt/wheels, if any).
#   RECSERVE_EPOCHS         the export job's epochs (default 1: this checks the deployment,
#                           not the model; empty: the quickstart recipes').
#   RECSERVE_COMPOSE_NO_CACHE=1  build without the layer cache (a cold build's time).
#   RECSERVE_COMPOSE_TIMEOUT     seconds from `up` to ready at most (default 1800).
# tests/test_compose.py runs this when RECSERVE_COMPOSE_CHECK=1.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "compose-check: $*"; }
fail() {
  echo "compose-check: FAIL: $*" >&2
  exit 1
}
for tool in podman docker-compose python3 curl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (docs/DEPLOYMENT.md, \"Compose\")"
done

project=recserve-check-$$
work=$(mktemp -d /tmp/recserve-compose.XXXXXX)
user=compose-check-user
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
export RECSERVE_ADMIN_TOKEN=$token RECSERVE_PUBLISH=127.0.0.1:$port
export RECSERVE_EPOCHS=${RECSERVE_EPOCHS-1}
compose=(docker-compose --project-name "$project" --file docker-compose.yml)
pids=()

teardown() {
  local rc=$?
  trap - EXIT
  set +e # a failing step here must not skip the rest of the teardown
  if [ -S "$work/podman.sock" ]; then
    mkdir -p runs
    "${compose[@]}" logs --no-color >runs/compose-check.log 2>&1
    if [ "$rc" != 0 ]; then
      say "the last log lines (all of them: runs/compose-check.log):"
      "${compose[@]}" logs --no-color --tail 40 service export >&2 2>&1
    fi
    say "tearing down project $project"
    "${compose[@]}" down --volumes --remove-orphans --timeout 10 >"$work/down.log" 2>&1 ||
      { cat "$work/down.log" >&2; rc=1; }
  fi
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  local left
  left=$({
    podman ps -aq --filter "label=com.docker.compose.project=$project"
    podman volume ls -q --filter "label=com.docker.compose.project=$project"
    podman network ls -q --filter "label=com.docker.compose.project=$project"
  } 2>/dev/null)
  if [ -n "$left" ]; then
    echo "compose-check: FAIL: left behind by project $project: $left" >&2
    rc=1
  fi
  rm -rf "$work"
  exit "$rc"
}
trap teardown EXIT

# ---- where the images come from
local_mode=${RECSERVE_COMPOSE_LOCAL:-auto}
if [ "$local_mode" = auto ]; then
  local_mode=1
  if podman image exists python:3.11-slim ||
    timeout 60 podman pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
    local_mode=0
  fi
fi
build_args=()
if [ "$local_mode" = 1 ]; then
  say "local stand-ins (docker/local/): no registry to pull the base images from"
  bash docker/local/podman-conf.sh "$work/containers.conf"
  export CONTAINERS_CONF=$work/containers.conf
  bash docker/local/build-base-images.sh
  build_args+=(--build-arg PYTHON_IMAGE=localhost/recserve-local/python:3.11)
  export RECSERVE_REDIS_IMAGE=localhost/recserve-local/redis:7
fi
wheel=${RECSERVE_TORCH_WHEEL:-}
if [ -z "$wheel" ] && ! curl -sf --max-time 15 -o /dev/null https://download.pytorch.org/whl/cpu/; then
  wheel=$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | tail -n 1 || true)
  [ -n "$wheel" ] || fail "download.pytorch.org cannot be reached: set RECSERVE_TORCH_WHEEL to a CPU torch wheel for Python 3.11"
fi
if [ -n "$wheel" ]; then
  [ -f "$wheel" ] || fail "RECSERVE_TORCH_WHEEL: no such file: $wheel"
  # torch-VERSION-TAGS.whl; docker/wheels/ is mounted into the torch step (docker/Dockerfile)
  torch_version=$(basename "$wheel" | cut -d- -f2)
  ln -f "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/
  say "torch $torch_version from $wheel (other packages from PyPI)"
  train_args=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg "TORCH_VERSION=$torch_version")
else
  train_args=()
fi
[ "${RECSERVE_COMPOSE_NO_CACHE:-}" = 1 ] && build_args+=(--no-cache)

# ---- build
build() {
  local target=$1 tag=$2
  shift 2
  local t0=$SECONDS
  # --format docker: podman's default OCI format drops the Dockerfile's HEALTHCHECK
  podman build --format docker --file docker/Dockerfile --target "$target" --tag "$tag" \
    "${build_args[@]}" "$@" . \
    >"$work/build-$target.log" 2>&1 || {
    tail -n 30 "$work/build-$target.log" >&2
    fail "podman build --target $target failed"
  }
  say "built $tag in $((SECONDS - t0)) s: $(podman image inspect --format '{{.Size}}' "$tag" |
    awk '{printf "%.0f MB", $1 / 1e6}')"
}
build serve recserve:serve-cpu
build train recserve:train-cpu "${train_args[@]}"

# ---- up
podman system service --time=0 "unix://$work/podman.sock" >"$work/podman-service.log" 2>&1 &
pids+=($!)
export DOCKER_HOST=unix://$work/podman.sock
for _ in $(seq 50); do [ -S "$work/podman.sock" ] && break; sleep 0.2; done
[ -S "$work/podman.sock" ] || fail "podman's API socket did not appear ($work/podman-service.log)"
if [ "$local_mode" = 1 ]; then
  bash docker/local/healthchecks.sh "$project" &
  pids+=($!)
fi
say "docker-compose up (project $project, service on $base, export epochs: ${RECSERVE_EPOCHS:-default})"
t_up=$SECONDS
deadline=$((SECONDS + ${RECSERVE_COMPOSE_TIMEOUT:-1800}))
"${compose[@]}" up --detach >"$work/up.log" 2>&1 || {
  cat "$work/up.log" >&2
  fail "docker-compose up failed"
}
say "up returned after $((SECONDS - t_up)) s (Redis healthy, the export job done, the service started)"

cid() { "${compose[@]}" ps -q "$1"; }
export_cid=$(podman ps -aq --filter "label=com.docker.compose.project=$project" \
  --filter "label=com.docker.compose.service=export")
[ "$(podman inspect --format '{{.State.ExitCode}}' "$export_cid")" = 0 ] ||
  fail "the export job did not succeed"
for gpu in export-gpu service-gpu; do
  [ -z "$(podman ps -aq --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$gpu")" ] ||
    fail "a plain up created $gpu (it belongs to the gpu profile)"
done

wait_ready() {
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/readyz")" = 200 ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "the service was not ready at $base/readyz in time"
    [ -n "$(cid service)" ] && [ "$(podman inspect --format '{{.State.Running}}' "$(cid service)")" = true ] ||
      fail "the service container is not running"
    sleep 0.5
  done
}
wait_ready
say "ready $((SECONDS - t_up)) s after up"

# ---- what the serve container promises
svc=$(cid service)
[ "$(podman exec "$svc" id -u)" = 10001 ] || fail "the service does not run as uid 10001"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$svc")" = true ] ||
  fail "the service's root filesystem is not read-only"
podman exec "$svc" sh -c 'touch /app/probe' 2>/dev/null && fail "the service could write to /app"
podman exec "$svc" python -c 'import torch' 2>/dev/null && fail "the serve image holds torch"
while true; do
  health=$(podman inspect --format '{{.State.Health.Status}}' "$svc")
  [ "$health" = healthy ] && break
  [ "$health" != unhealthy ] && [ "$SECONDS" -lt "$deadline" ] ||
    fail "the service's healthcheck: $health ($(podman inspect --format \
      '{{with $l := .State.Health.Log}}{{(index $l 0).Output}}{{end}}' "$svc" | tail -n 2))"
  sleep 1
done
say "service container: uid 10001, read-only root, no torch, healthy"

# ---- traffic: python3 with the standard library only, so nothing but the script is needed
requests() {
  python3 - "$base" "$token" "$user" "$work/answer.json" "$1" <<'PY'
import json
import sys
import urllib.error
import urllib.request

base, token, user, saved, phase = sys.argv[1:]
AT = 1_750_000_000  # fixed request time: the same history ranks the same way


def call(path, body=None, token=None):
    request = urllib.request.Request(base + path, method="POST" if body is not None or
                                     path.startswith("/admin") else "GET")
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def ok(path, body=None, token=None):
    status, answer = call(path, body, token)
    if status != 200:
        sys.exit(f"compose-check: FAIL: {path} answered {status}: {answer}")
    return answer


def ids(answer):
    return [item["item_id"] for item in answer["items"]]


if phase == "before":
    # Three of the catalogue's items, whatever the bundle: the first answer to a one-item
    # history (popularity when that item is unknown).
    first = ok("/recommend", {"history": [{"item_id": "1", "ts": AT - 100}], "k": 3, "at": AT})
    events = [{"user_id": user, "item_id": item, "ts": AT - 60 + i} for i, item in
              enumerate(ids(first))]
    added = ok("/events", events)
    if added["added"] != len(events):
        sys.exit(f"compose-check: FAIL: /events added {added['added']} of {len(events)}")
    stored = ok("/recommend", {"user_id": user, "k": 10, "at": AT})
    sent = ok("/recommend", {"history": [{k: e[k] for k in ("item_id", "ts")} for e in events],
                             "k": 10, "at": AT})
    if stored["fallback"] or ids(stored) != ids(sent):
        sys.exit("compose-check: FAIL: /recommend from the stored history differs from the "
                 f"same history sent: {ids(stored)} vs {ids(sent)}")
    json.dump(ids(stored), open(saved, "w"))
    print(f"compose-check: /events stored {len(events)} events for {user}; /recommend from "
          f"them: {ids(stored)[:5]}... (bundle {stored['bundle']}, encoder {stored['encoder']})")
elif phase == "reload":
    status, answer = call("/admin/reload")
    if status != 401:
        sys.exit(f"compose-check: FAIL: /admin/reload without the token answered {status}")
    answer = ok("/admin/reload", token=token)
    print(f"compose-check: /admin/reload with the admin token: 200 {json.dumps(answer)[:160]}")
elif phase == "after":
    again = ok("/recommend", {"user_id": user, "k": 10, "at": AT})
    before = json.load(open(saved))
    if again["fallback"] or ids(again) != before:
        sys.exit(f"compose-check: FAIL: after the restart {user}'s answer changed: "
                 f"{ids(again)} vs {before}")
    print(f"compose-check: after the restart, {user}'s answer is the same ten items")
PY
}
requests before
requests reload

# ---- the histories outlive the service container
say "restarting the service container"
"${compose[@]}" restart service >"$work/restart.log" 2>&1 || {
  cat "$work/restart.log" >&2
  fail "docker-compose restart service failed"
}
t_restart=$SECONDS
wait_ready
say "ready again $((SECONDS - t_restart)) s after the restart"
requests after
history_key="recserve:hp:{recserve:hist:$(printf %s "$user" | sha256sum | cut -c1-40)}"
[ "$(podman exec "$(cid redis)" redis-cli EXISTS "$history_key")" = 1 ] ||
  fail "Redis holds no history for $user ($history_key)"
say "Redis holds $user's history ($history_key)"
say "OK"
