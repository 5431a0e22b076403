#!/usr/bin/env bash
# LOCAL STAND-INS ONLY: podman settings for the development machine of issue 21.
# Writes a containers.conf to the path given ($1) for podman to read through CONTAINERS_CONF
# (scripts/compose-check.sh does so when it runs on local stand-ins), because this host's
# defaults cannot start a container:
# - crun refuses the host's cgroup layout; runc works.
# - runc fails with "error setting rlimit ... operation not permitted" for podman's default
#   limits (open files 1048576, processes 4194304) and for any above this host's: open files
#   at most the shell's hard limit, processes at most kernel.pid_max.
set -euo pipefail
out=${1:?usage: podman-conf.sh OUTPUT}
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
cat >"$out" <<CONF
# written by docker/local/podman-conf.sh for scripts/compose-check.sh
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
CONF
