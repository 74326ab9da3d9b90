#!/usr/bin/env bash
# Set up, then run the test suite: ./scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
status=0
.venv/bin/python -m pytest "$@" || status=$?
# pytest exits 5 when it collected no tests; that is not a failure of the suite.
if [ "$status" -eq 5 ]; then
  echo "no tests ran"
  exit 0
fi
exit "$status"
