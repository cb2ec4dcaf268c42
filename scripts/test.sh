#!/usr/bin/env bash
# The project's test command: installs what is missing (idempotent), then runs the default test suite
# against real runsc, network namespaces and nftables. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
CORRAL_TEST_TOOLS=1 scripts/install.sh
# Two workers, each taking whole modules: test modules wait on sandboxes
# much of the time, so two at once use the second core. CORRAL_TEST_WORKERS=0 runs them one by one.
exec .venv/bin/python -m pytest -n "${CORRAL_TEST_WORKERS:-2}" --dist loadfile "$@"
