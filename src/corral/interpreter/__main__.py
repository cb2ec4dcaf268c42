"""`python -m corral.interpreter`: serve on port 49999 after the default Python context is up, so a
template snapshot taken once the port answers already holds a warm kernel."""

from __future__ import annotations

import argparse
import contextlib
import logging

import uvicorn

from corral.interpreter import DEFAULT_PORT
from corral.interpreter.app import Interpreter, create_app
from corral.interpreter.execute import run_silently


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--cwd", default="/home/user")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    interpreter = Interpreter(default_cwd=args.cwd)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        ctx = await interpreter.contexts.default("python")
        await run_silently(ctx, "1")
        yield

    uvicorn.run(create_app(interpreter, lifespan=lifespan), host=args.host, port=args.port, log_level="warning",
                access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
