#!/usr/bin/env bash
# The project's test command: installs what is missing (idempotent), then runs the default test suite
# against real runsc, network namespaces and nftables. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
CORRAL_TEST_TOOLS=1 scripts/install.sh
exec .venv/bin/python -m pytest "$@"
