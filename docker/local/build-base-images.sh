#!/usr/bin/env bash
# LOCAL STAND-INS ONLY: not used on a machine that can pull from Docker Hub.
# Where no container registry is reachable (the development machine of issue 21), builds the
# two public base images docker-compose.yml and docker/Dockerfile name from Debian bookworm
# packages with debootstrap, and imports them into podman:
#   localhost/recserve-local/python:3.11  stands in for python:3.11-slim (bookworm's Python 3.11,
#                                         venv, `python` on PATH, ca-certificates)
#   localhost/recserve-local/redis:7      stands in for redis:7-alpine (bookworm's Redis 7)
# scripts/compose-check.sh passes them in (build arg PYTHON_IMAGE, env RECSERVE_REDIS_IMAGE).
# An image already present is kept; --force rebuilds both. Needs root, debootstrap, podman.
set -euo pipefail
force=
[ "${1:-}" = "--force" ] && force=1
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON_TAG=localhost/recserve-local/python:3.11
REDIS_TAG=localhost/recserve-local/redis:7

have() { podman image exists "$1"; }

# debootstrap a minimal bookworm with extra packages into a temporary folder, trim what an
# image never needs, and import it with the given config changes.
build() {
  local tag=$1 include=$2
  shift 2
  local root
  root=$(mktemp -d /var/tmp/recserve-rootfs.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  echo "== debootstrap bookworm (+ $include) for $tag"
  debootstrap --variant=minbase --include="$include" bookworm "$root" "$mirror" \
    >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    echo "error: debootstrap failed for $tag (whole log: $root.log)" >&2
    return 1
  }
  rm -f "$root.log"
  # This host reaches PyPI through a TLS-intercepting egress proxy: the image must trust the
  # CAs the host trusts, or pip inside a build cannot fetch anything.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null && [ -d "$root/usr/share/ca-certificates" ]; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
  fi
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/* "$root"/var/log/* "$root"/var/cache/debconf/*-old
  local changes=()
  for change in "$@"; do changes+=(--change "$change"); done
  tar -C "$root" -c . | podman import -q "${changes[@]}" - "$tag" >/dev/null
  echo "== imported $tag ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
}

if [ -n "$force" ] || ! have "$PYTHON_TAG"; then
  build "$PYTHON_TAG" python3,python3-venv,python-is-python3,ca-certificates \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV LANG=C.UTF-8' 'CMD ["python3"]'
fi
if [ -n "$force" ] || ! have "$REDIS_TAG"; then
  build "$REDIS_TAG" redis-server \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'WORKDIR /var/lib/redis' 'USER redis' 'EXPOSE 6379' 'CMD ["redis-server"]'
fi
