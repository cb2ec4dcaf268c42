#!/usr/bin/env bash
# The project's test command: installs what is missing (idempotent), then runs the default test suite
# against real runsc, network namespaces and nftables. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
CORRAL_TEST_TOOLS=1 scripts/install.sh
# Two test modules at a time on two pytest-xdist workers (whole modules each; docs/architecture.md "Tests"):
# ~18 min here instead of ~30. CORRAL_TEST_WORKERS=0 runs one module at a time.
exec .venv/bin/python -m pytest -n "${CORRAL_TEST_WORKERS:-2}" --dist loadfile "$@"
