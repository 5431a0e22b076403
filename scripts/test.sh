#!/usr/bin/env bash
# The project's test command: install what is missing (the project, a browser for the demo
# page's tests where apt can), make sure Redis answers, lint, test.
# Extra arguments go to pytest (e.g. scripts/test.sh -k data -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure-redis.sh
bash scripts/ensure-browser.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
