#!/usr/bin/env bash
# The demo page's browser tests drive Debian's chromium with Selenium. Install chromium and
# chromium-driver where apt can (as root); elsewhere say so once, and those tests skip with
# the reason. Never fails the caller: the rest of the suite does not need a browser.
set -uo pipefail
cd "$(dirname "$0")/.."
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "no chromium/chromedriver and no apt as root here: the browser tests will skip"
  exit 0
fi
mkdir -p runs
log=runs/browser-install.log
echo "installing chromium and chromium-driver for the browser tests (log: $log)"
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet: update once if the first try fails.
if ! apt-get install -y -q chromium chromium-driver >"$log" 2>&1; then
  apt-get update -q >>"$log" 2>&1
  apt-get install -y -q chromium chromium-driver >>"$log" 2>&1 ||
    echo "chromium could not be installed (see $log): the browser tests will skip"
fi
exit 0
