"""Routes for watching the server and its sandboxes: Prometheus's `/metrics` (observability/metrics.py) and
E2B's sandbox logs (`/sandboxes/{id}/logs`, `/v2/sandboxes/{id}/logs`; control/sandbox_logs.py).

Who may scrape `/metrics` (docs/operations.md): it shows every team's activity (sandboxes per template,
creates per key id), so an API key is not enough. With CORRAL_METRICS_TOKEN set, a scrape must send
`Authorization: Bearer <token>`; with CORRAL_METRICS_PUBLIC=1 anyone who reaches the listener may; with
neither, only clients on loopback may."""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from corral.control import sandbox_logs
from corral.control.api_common import ERRORS, Key, iso
from corral.control.errors import ApiError, HostPaths
from corral.control.keys import Owner

if TYPE_CHECKING:
    from corral.config import PlatformSettings
    from corral.control.plane import ControlPlane

LEVELS = ("debug", "info", "warn", "error")


class SandboxLog(BaseModel):
    timestamp: str
    line: str


class SandboxLogEntry(BaseModel):
    timestamp: str
    message: str
    level: Literal["debug", "info", "warn", "error"]
    fields: dict[str, str]


class SandboxLogs(BaseModel):
    """Every line twice, as E2B answers: plain (`logs`) and structured (`logEntries`); `fields.source` is
    `runtime` (the sandbox's console and the runtime's messages) or `start` (the template's start
    command), `fields.line` the line's number within its source."""

    logs: list[SandboxLog]
    logEntries: list[SandboxLogEntry]


class SandboxLogsV2(BaseModel):
    logs: list[SandboxLogEntry]


def _entry(line: sandbox_logs.LogLine) -> SandboxLogEntry:
    return SandboxLogEntry(timestamp=iso(line.timestamp), message=line.line, level=line.level,
                           fields={"source": line.source, "line": str(line.number)})


def scrape_refusal(request: Request, settings: PlatformSettings) -> ApiError | None:
    """Why this client may not scrape /metrics, or None when it may."""
    if settings.metrics_public:
        return None
    if settings.metrics_token:
        presented = request.headers.get("authorization", "")
        if hmac.compare_digest(presented.encode(), f"Bearer {settings.metrics_token}".encode()):
            return None
        return ApiError(401, "/metrics needs the header `Authorization: Bearer <token>` with this server's "
                             "CORRAL_METRICS_TOKEN")
    client = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(client).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return ApiError(403, "/metrics answers only clients on this machine: set CORRAL_METRICS_TOKEN (scrapes "
                         "then send it as a bearer token) or CORRAL_METRICS_PUBLIC=1 to let others scrape")


def observability_routes(plane: ControlPlane, paths: HostPaths | None = None) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", tags=["server"], response_class=Response,
                responses={200: {"content": {"text/plain": {}},
                                 "description": "Prometheus text exposition (docs/operations.md)"},
                           401: {"model": ERRORS[401]["model"]}, 403: {"model": ERRORS[401]["model"]}})
    async def metrics(request: Request) -> Response:
        """The server's Prometheus metrics: sandboxes by state and template, create/resume/fork latency,
        pool levels, restore failures, proxy traffic, template builds, creates per API key id."""
        if (refusal := scrape_refusal(request, plane.settings)) is not None:
            raise refusal
        return Response(await plane.metrics.render(plane), media_type=CONTENT_TYPE_LATEST)

    async def read(owner: Owner, sandbox_id: str) -> list[sandbox_logs.LogLine]:
        await plane.sandboxes.get(owner, sandbox_id)  # 404 unless it is the caller's
        async with plane.sandboxes.locks[sandbox_id]:  # not paused or killed while it is read
            return await sandbox_logs.read_sandbox_logs(plane.orchestrator, sandbox_id, paths)

    @router.get("/sandboxes/{sandbox_id}/logs", response_model=SandboxLogs, responses=ERRORS, tags=["sandboxes"])
    async def logs_v1(sandbox_id: str, key: Key,
                      start: Annotated[int | None, Query(ge=0, description=(
                          "Lines at or after this time, in milliseconds since the epoch. A line's time is "
                          "when its source was last written (docs/operations.md)."))] = None,
                      limit: Annotated[int, Query(ge=0, le=1000, description="At most this many, the "
                                                                             "oldest first.")] = 1000
                      ) -> SandboxLogs:
        """What envd and the template's start command printed, oldest first (a running sandbox's only)."""
        lines = sandbox_logs.since(await read(key.owner, sandbox_id), start)[:limit]
        return SandboxLogs(logs=[SandboxLog(timestamp=iso(line.timestamp), line=line.line) for line in lines],
                           logEntries=[_entry(line) for line in lines])

    @router.get("/v2/sandboxes/{sandbox_id}/logs", response_model=SandboxLogsV2, responses=ERRORS,
                tags=["sandboxes"])
    async def logs_v2(sandbox_id: str, key: Key,
                      cursor: Annotated[int | None, Query(ge=0, description=(
                          "Milliseconds since the epoch: lines at or after it (forward), at or before it "
                          "(backward)."))] = None,
                      limit: Annotated[int, Query(ge=0, le=1000)] = 1000,
                      direction: Annotated[Literal["forward", "backward"], Query()] = "forward",
                      level: Annotated[Literal["debug", "info", "warn", "error"] | None, Query(
                          description="The lowest level returned.")] = None,
                      search: Annotated[str | None, Query(max_length=256, description=(
                          "Only lines that contain this (case-sensitive)."))] = None) -> SandboxLogsV2:
        lines = await read(key.owner, sandbox_id)
        if direction == "backward":
            lines = [line for line in reversed(lines) if cursor is None or line.timestamp * 1000 <= cursor]
        else:
            lines = sandbox_logs.since(lines, cursor)
        if level is not None:
            lines = [line for line in lines if LEVELS.index(line.level) >= LEVELS.index(level)]
        if search:
            lines = [line for line in lines if search in line.line]
        return SandboxLogsV2(logs=[_entry(line) for line in lines[:limit]])

    return router
