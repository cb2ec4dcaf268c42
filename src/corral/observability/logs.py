"""Request ids and the server's log format.

Every API request gets an id: the client's own `X-Request-ID` when it is a sane one (a proxy or a client
that already has one keeps its trace), else a new one. It is sent back in the `X-Request-ID` header, put in
every error body (`requestID`, control/api.py) and in every log line written while the request is handled
(a context variable, so code deep in the control plane needs no parameter for it). `--log-format json`
writes each log line as one JSON object.

Only the API's requests get ids, not the sandbox proxy's: that path is kept as cheap as it can be."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER = REQUEST_ID_HEADER.lower().encode()
# What an incoming id may be to be kept: short, printable, nothing that could break a log line or a header.
_SANE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}$")

request_id: ContextVar[str | None] = ContextVar("corral_request_id", default=None)
access_log = logging.getLogger("corral.access")


def request_id_for(incoming: str | None) -> str:
    """The client's id when it is sane, else a new one."""
    if incoming is not None and _SANE.match(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestIds:
    """ASGI middleware: sets the request id for the request's task, returns it in `X-Request-ID`, and
    logs each request on `corral.access` (DEBUG; INFO for answers of 400 and above)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == _HEADER), None)
        rid = request_id_for(incoming)
        # Not reset afterwards: the error handler for unexpected exceptions (Starlette's outermost
        # middleware) answers after this returns, in the same task, and names the id too.
        request_id.set(rid)
        status = 500  # what the client gets when the app raises (the outer handler answers it)
        started = time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(k.lower() == _HEADER for k, _ in headers):
                    headers.append((_HEADER, rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            level = logging.INFO if status >= 400 else logging.DEBUG
            if access_log.isEnabledFor(level):
                ms = (time.perf_counter() - started) * 1000
                # The path without its query: a query can carry a signature (template uploads).
                access_log.log(level, "%s %s %d %.1f ms", scope["method"], scope["path"], status, ms,
                               extra={"http": {"method": scope["method"], "path": scope["path"], "status": status,
                                               "durationMs": round(ms, 1)}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, message, requestID (inside a request),
    `http` (access lines) and `exception` (a traceback, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {"ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
                       .replace("+00:00", "Z"), "level": record.levelname.lower(), "logger": record.name,
                       "message": record.getMessage()}
        if (rid := request_id.get()) is not None:
            entry["requestID"] = rid
        if isinstance(http := getattr(record, "http", None), dict):
            entry["http"] = http
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exception"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


LOG_FORMATS = ("text", "json")


def configure_logging(log_format: str, level: str) -> None:
    """The root logger for `corral serve`: the text format as before, or JSON lines (uvicorn's own loggers
    then propagate to it instead of keeping their own format; see cli/serve.py)."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=numeric, handlers=[handler], force=True)
    else:
        logging.basicConfig(level=numeric)
