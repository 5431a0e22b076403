#!/usr/bin/env bash
# LOCAL STAND-INS ONLY: runs the healthchecks of a compose project's containers.
# podman (4.3 here) schedules healthchecks with systemd timers; without systemd (this
# development machine) no check ever runs and a container stays "starting", so compose's
# `depends_on: condition: service_healthy` would wait forever. This loop does what the timers
# would: `podman healthcheck run` for each running container of the project, at the
# interval its healthcheck names. Runs until killed. Usage: healthchecks.sh PROJECT
set -uo pipefail
project=${1:?usage: healthchecks.sh COMPOSE_PROJECT}
declare -A next
while true; do
  now=$(date +%s)
  for id in $(podman ps -q --filter "label=com.docker.compose.project=$project" 2>/dev/null); do
    check=$(podman inspect --format '{{json .Config.Healthcheck}}' "$id" 2>/dev/null) || continue
    # no healthcheck: "null"; the interval is in nanoseconds (podman's default 30 s if absent)
    [[ $check == *'"Test"'* ]] || continue
    interval_ns=30000000000
    [[ $check =~ \"Interval\":([0-9]+) ]] && interval_ns=${BASH_REMATCH[1]}
    [ "${next[$id]:-0}" -le "$now" ] || continue
    next[$id]=$((now + (interval_ns > 1000000000 ? interval_ns / 1000000000 : 1)))
    podman healthcheck run "$id" >/dev/null 2>&1 &
  done
  sleep 1
done
