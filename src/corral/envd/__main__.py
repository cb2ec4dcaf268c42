"""`python -m corral.envd [--port N]`: serve envd."""

from __future__ import annotations

import argparse
import os
import sys

try:
    import pyqwest  # noqa: F401 - present when envd runs from a development checkout
except ImportError:
    from corral.envd import _no_http_client

    sys.modules["pyqwest"] = _no_http_client

import uvicorn

from corral.envd import DEFAULT_PORT
from corral.envd.app import EnvdApp
from corral.envd.oom import OomGuard
from corral.envd.state import SandboxState


def main() -> None:
    parser = argparse.ArgumentParser(prog="envd", description="Corral's in-sandbox daemon (E2B envd protocol)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--default-user", default=os.environ.get("ENVD_DEFAULT_USER", "root"))
    parser.add_argument("--workdir", default=os.environ.get("ENVD_WORKDIR"))
    parser.add_argument("--oom-guard", action="store_true",
                        help="kill the largest process when the sandbox runs out of memory (inside a sandbox "
                             "only: it reads the sandbox's limit from /proc/meminfo)")
    args = parser.parse_args()
    guard = None
    if args.oom_guard:
        guard = OomGuard()
        guard.start()
    state = SandboxState(default_user=args.default_user, default_workdir=args.workdir)
    uvicorn.run(EnvdApp(state, oom_guard=guard), host=args.host, port=args.port, log_level="warning", access_log=False,
                # SDK clients keep connections pooled for up to 300 s; do not drop them sooner.
                timeout_keep_alive=300, lifespan="on")


if __name__ == "__main__":
    main()
