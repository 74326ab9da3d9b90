#!/usr/bin/env bash
# Set up, then run the whole farm on this machine: ./scripts/dev.sh [--port N] [--workers K]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ultralight dev "$@"
