#!/usr/bin/env bash
# Make sure a Redis answers at $RECSERVE_REDIS_URL (default redis://127.0.0.1:6379/0);
# start a local, non-persistent redis-server when none does.
set -euo pipefail
url=${RECSERVE_REDIS_URL:-redis://127.0.0.1:6379/0}
hostport=${url#redis://}
hostport=${hostport%%/*}
host=${hostport%%:*}
port=${hostport##*:}
[ "$port" = "$host" ] && port=6379

answers() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; }

if answers; then
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "no Redis answers at $host:$port and redis-server is not installed" >&2
  echo "(Debian/Ubuntu: apt-get install redis-server; or set RECSERVE_REDIS_URL)" >&2
  exit 1
fi
echo "starting redis-server on $host:$port"
redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
  --logfile "${TMPDIR:-/tmp}/recserve-redis-$port.log"
for _ in $(seq 50); do
  answers && exit 0
  sleep 0.1
done
echo "redis-server did not answer on $host:$port" >&2
exit 1
