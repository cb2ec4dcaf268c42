"""The E2B-compatible REST API (FastAPI): exact success codes and `{code, message}` errors, since the SDKs
parse nothing else (errors also name the request's id, `requestID`, which the SDKs pass over)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Annotated
from urllib.parse import parse_qsl, unquote

from fastapi import Body, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.control import schemas
from corral.control.api_branching import branching_routes
from corral.control.api_common import (
    CLIENT_ID,
    ERRORS,
    Key,
    envd_token_for,
    iso,
    page_offset,
    page_token,
    sandbox_answer,
)
from corral.control.api_observability import observability_routes
from corral.control.api_recordings import recording_routes
from corral.control.api_secrets import secrets_routes
from corral.control.api_templates import template_routes
from corral.control.api_usage import usage_routes
from corral.control.api_volumes import volume_routes
from corral.control.api_webhooks import webhook_routes
from corral.control.db import SandboxRow
from corral.control.errors import ApiError, HostPaths, to_http
from corral.control.keys import ApiKey, ApiKeys, check_template, check_timeout
from corral.control.network import Egress, Ingress, egress_from, ingress_from_create, refuse_iam
from corral.control.plane import ControlPlane
from corral.control.sandboxes import ListQuery
from corral.control.scopes import SECRETS, VOLUMES
from corral.dashboard.app import create_dashboard
from corral.envd import ENVD_VERSION
from corral.observability.logs import REQUEST_ID_HEADER, RequestIds, request_id
from corral.orchestrator.envd_link import EnvdUnavailable
from corral.runtime.base import RuntimeError_

log = logging.getLogger("corral.api")


def _listed(row: SandboxRow) -> dict:
    return dict(templateID=row.template.partition(":")[0], alias=row.template, sandboxID=row.id, clientID=CLIENT_ID,
                startedAt=iso(row.started_at), endAt=iso(row.end_at), cpuCount=max(1, round(row.vcpus)),
                memoryMB=row.memory_mb, diskSizeMB=row.disk_mb, metadata=row.sandbox_metadata or {},
                state=row.state, envdVersion=ENVD_VERSION,
                volumeMounts=[{"name": m["name"], "path": m["path"]} for m in row.volume_mounts]
                if row.volume_mounts else None)


def _detail(row: SandboxRow, key: ApiKey, domain: str | None) -> schemas.SandboxDetail:
    lifecycle = row.lifecycle or {}
    return schemas.SandboxDetail(**_listed(row), envdAccessToken=envd_token_for(key, row),
                                 allowInternetAccess=row.internet,
                                 domain=domain, network={**Ingress.from_record(row.ingress).as_read_back(),
                                                         **Egress.from_record(row.egress).as_read_back()},
                                 lifecycle=schemas.Lifecycle(autoResume=bool(lifecycle.get("autoResume")),
                                                             onTimeout=lifecycle.get("onTimeout", "kill")),
                                 pauseMode=row.pause_mode if row.state == "paused" else None)


def _parse_metadata(raw: str | None) -> dict[str, str]:
    """The SDK sends `urlencode({quote(k): quote(v)})` as one query value."""
    if not raw:
        return {}
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        pairs = None
    if not pairs or any(not key for key, _ in pairs):
        raise ApiError(400, f"metadata must be key=value pairs joined by '&' (each key and value URL-encoded, "
                            f"as the SDKs send them), got {raw!r}")
    return {unquote(k): unquote(v) for k, v in pairs}


def _parse_time(raw: str | None, name: str) -> float | None:
    """RFC 3339, as the SDKs send it: Python `2026-08-21T12:00:00.123456+02:00`, JS `...T10:00:00.123Z`."""
    if raw is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"{name} must be an RFC 3339 timestamp such as 2026-01-02T15:04:05Z, "
                            f"got {raw!r}") from None
    if parsed.tzinfo is None:  # whose local time would it be? RFC 3339 requires the offset
        raise ApiError(400, f"{name} must carry a UTC offset ('Z' or e.g. '+02:00'), got {raw!r}")
    return parsed.timestamp()


def create_api(plane: ControlPlane, keys: ApiKeys, paths: HostPaths | None = None) -> FastAPI:
    """`paths`: the server's directories, described instead of named in error messages."""
    app = FastAPI(title="Corral API", version=__version__,
                  description="E2B-compatible sandbox API served by Corral. Authenticate with `X-API-KEY`.")
    app.state.keys = keys
    app.add_middleware(RequestIds)

    def error_body(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        # The header is named here too: an unexpected exception is answered outside RequestIds.
        rid = request_id.get()
        return JSONResponse({"code": status, "message": message, "requestID": rid}, status_code=status,
                            headers={**(headers or {}), **({REQUEST_ID_HEADER: rid} if rid else {})})

    async def error_answer(request: Request, exc: Exception) -> JSONResponse:
        status, message = to_http(exc, paths)
        if status >= 500 and not isinstance(exc, ApiError):
            log.warning("%s %s: %s", request.method, request.url.path, exc)  # with the paths the client is not shown
        return error_body(status, message, getattr(exc, "headers", None))

    # Exception last: what nothing else answers is a 500 in the same shape (Starlette still logs it).
    for kind in (ApiError, RuntimeError_, EnvdUnavailable, Exception):
        app.add_exception_handler(kind, error_answer)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_body(400, problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_body(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.get("/health", response_model=schemas.Health, tags=["server"])
    async def health() -> schemas.Health:
        capacity = plane.orchestrator.capacity
        return schemas.Health(sandboxes=len(plane.orchestrator.live_ids()),
                              pooled={t: capacity.ready(t) for t in capacity.ready_templates},
                              resumeReady=plane.orchestrator.resume_ready())

    async def _create(key: ApiKey, body: schemas.NewSandbox) -> schemas.Sandbox:
        lifecycle = {"onTimeout": "pause" if body.autoPause else "kill",
                     "autoResume": bool(body.autoResume and body.autoResume.enabled),
                     "autoPauseMemory": body.autoPauseMemory is not False}
        refuse_iam(body.iam)
        ingress, egress = ingress_from_create(body.network), egress_from(body.network)
        template = body.templateID
        check_template(key.limits, template, await plane.template_name(key.owner, template))
        # A create can reach a team's secrets (header rules send them, `${e2b.secrets.<name>}`) and volumes
        # (mounts): those need the scopes that guard them, not only `sandboxes`.
        if body.network and "${e2b.secrets." in json.dumps(body.network, default=str) and not key.allows(SECRETS):
            raise ApiError(403, "this API key lacks the 'secrets' scope its header rules' secrets need")
        if body.volumeMounts and not key.allows(VOLUMES):
            raise ApiError(403, "this API key lacks the 'volumes' scope that mounting volumes needs")
        if plane.templates is not None:
            template = await plane.templates.runtime_key(key.owner, template) or template
        row = await plane.sandboxes.create(key.owner, template, timeout=body.timeout,
                                           metadata=body.metadata or {}, env_vars=body.envVars or {},
                                           internet=body.allow_internet_access is not False, lifecycle=lifecycle,
                                           ingress=ingress, egress=egress,
                                           volume_mounts=[m.model_dump() for m in body.volumeMounts or ()])
        return sandbox_answer(row, key, plane.public_domain)

    @app.post("/v2/sandboxes", status_code=201, response_model=schemas.Sandbox, responses=ERRORS,
              tags=["sandboxes"])
    async def create_v2(body: schemas.NewSandbox, key: Key) -> schemas.Sandbox:
        return await _create(key, body)

    @app.post("/sandboxes", status_code=201, response_model=schemas.Sandbox, responses=ERRORS,
              tags=["sandboxes (legacy)"])
    async def create_legacy(body: schemas.NewSandbox, key: Key) -> schemas.Sandbox:
        return await _create(key, body)

    async def _connect(key: ApiKey, sandbox_id: str, body: schemas.ConnectSandbox | None,
                       response: Response) -> schemas.Sandbox:
        if body and body.timeout is not None:
            check_timeout(key.limits, body.timeout)
        row, resumed = await plane.branching.resume(key.owner, sandbox_id, timeout=body.timeout if body else None,
                                                    memory=not (body and body.memory is False))
        response.status_code = 201 if resumed else 200
        return sandbox_answer(row, key, plane.public_domain)

    @app.post("/v2/sandboxes/{sandbox_id}/connect", response_model=schemas.Sandbox,
              responses={**ERRORS, 201: {"model": schemas.Sandbox, "description": "resumed a paused sandbox"}},
              tags=["sandboxes"])
    async def connect_v2(sandbox_id: str, key: Key, response: Response,
                         body: schemas.ConnectSandbox | None = None) -> schemas.Sandbox:
        return await _connect(key, sandbox_id, body, response)

    @app.post("/sandboxes/{sandbox_id}/connect", response_model=schemas.Sandbox,
              responses={**ERRORS, 201: {"model": schemas.Sandbox, "description": "resumed a paused sandbox"}},
              tags=["sandboxes (legacy)"])
    async def connect_legacy(sandbox_id: str, key: Key, response: Response,
                             body: schemas.ConnectSandbox | None = None) -> schemas.Sandbox:
        return await _connect(key, sandbox_id, body, response)

    @app.post("/sandboxes/{sandbox_id}/resume", status_code=201, response_model=schemas.Sandbox,
              responses={**ERRORS, 409: {"model": schemas.Error}}, tags=["sandboxes (legacy)"])
    async def resume_legacy(sandbox_id: str, key: Key, body: schemas.ConnectSandbox | None = None):
        if (await plane.sandboxes.get(key.owner, sandbox_id)).state == "running":
            raise ApiError(409, f"sandbox {sandbox_id} is already running")
        if body and body.timeout is not None:
            check_timeout(key.limits, body.timeout)
        row, _ = await plane.branching.resume(key.owner, sandbox_id, timeout=body.timeout if body else None,
                                              memory=not (body and body.memory is False))
        return sandbox_answer(row, key, plane.public_domain)

    async def _list(key: ApiKey, metadata: str | None, state: str | None, order: str | None,
                    started_after: str | None, template: str | None, limit: int | None,
                    next_token: str | None, response: Response) -> list[dict]:
        states = {s for s in (state or "running,paused").split(",") if s}
        unknown = states - {"running", "paused"}
        if unknown:
            raise ApiError(400, f"unknown state(s): {', '.join(sorted(unknown))}")
        if order not in (None, "asc", "desc"):
            raise ApiError(400, "order must be asc or desc")
        query = ListQuery(metadata=_parse_metadata(metadata), states=states, order=order or "desc",
                          started_after=_parse_time(started_after, "startedAfter"), template=template)
        rows = await plane.sandboxes.list(key.owner, query)
        offset = page_offset(next_token)
        end = len(rows) if limit is None else offset + limit
        if end < len(rows):
            response.headers["X-Next-Token"] = page_token(end)
        response.headers["X-Total-Running"] = str(sum(1 for r in rows if r.state == "running"))
        return [_listed(r) for r in rows[offset:end]]

    @app.get("/v2/sandboxes", response_model=list[schemas.ListedSandbox], responses=ERRORS, tags=["sandboxes"])
    async def list_v2(
            key: Key, response: Response,
            metadata: Annotated[str | None, Query(description=(
                "Sandboxes whose metadata holds all these pairs, sent as the SDKs do: "
                "`urlencode({quote(key): quote(value)})` as one value."))] = None,
            state: Annotated[str | None, Query(description="Comma-separated `running`, `paused`; both when "
                                                           "omitted.")] = None,
            order: Annotated[str | None, Query(description="`asc` or `desc` (the default) by start time, over "
                                                           "the whole result before paging.")] = None,
            startedAfter: Annotated[str | None, Query(description=(
                "Sandboxes started at or after this RFC 3339 time, which must carry a UTC offset (`Z`, "
                "`+02:00`); a `startedAt` read back from the API includes its own sandbox."))] = None,
            template: Annotated[str | None, Query(description="Template ID or name; an unknown one lists "
                                                              "nothing.")] = None,
            limit: Annotated[int | None, Query(ge=1, le=100, description="Page size; the whole result when "
                                                                         "omitted.")] = None,
            nextToken: Annotated[str | None, Query(description="The previous page's `X-Next-Token`.")] = None,
    ) -> list[dict]:
        return await _list(key, metadata, state, order, startedAfter, template, limit, nextToken, response)

    @app.get("/sandboxes", response_model=list[schemas.ListedSandbox], responses=ERRORS,
             tags=["sandboxes (legacy)"])
    async def list_legacy(key: Key, response: Response, metadata: str | None = None) -> list[dict]:
        return await _list(key, metadata, "running", None, None, None, None, None, response)

    # Unset fields are left out, not sent as null: the SDK parses e.g. a null pauseMode as an enum value.
    @app.get("/sandboxes/{sandbox_id}", response_model=schemas.SandboxDetail, responses=ERRORS,
             response_model_exclude_none=True, tags=["sandboxes"])
    async def get_sandbox(sandbox_id: str, key: Key) -> schemas.SandboxDetail:
        return _detail(await plane.sandboxes.get(key.owner, sandbox_id), key, plane.public_domain)

    @app.delete("/sandboxes/{sandbox_id}", status_code=204, responses=ERRORS, tags=["sandboxes"])
    async def kill_sandbox(sandbox_id: str, key: Key) -> Response:
        await plane.sandboxes.kill(key.owner, sandbox_id)
        return Response(status_code=204)

    @app.put("/sandboxes/{sandbox_id}/network", status_code=204, responses=ERRORS, tags=["sandboxes"])
    async def update_network(sandbox_id: str, key: Key, body: dict = Body(default_factory=dict)) -> Response:
        """Replaces the sandbox's egress configuration (every omitted option is cleared): the internet
        switch and rules by address; rules by domain, header rules, DNS servers and proxies are refused."""
        await plane.sandboxes.update_network(key.owner, sandbox_id, body)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/timeout", status_code=204, responses=ERRORS, tags=["sandboxes"])
    async def set_timeout(sandbox_id: str, body: schemas.SetTimeout, key: Key) -> Response:
        check_timeout(key.limits, body.timeout)
        await plane.sandboxes.set_timeout(key.owner, sandbox_id, body.timeout)
        return Response(status_code=204)

    @app.get("/sandboxes/{sandbox_id}/metrics", response_model=list[schemas.SandboxMetric], responses=ERRORS,
             tags=["sandboxes"])
    async def metrics(sandbox_id: str, key: Key, start: int | None = None, end: int | None = None):
        rows = await plane.sandboxes.metrics(key.owner, sandbox_id, start, end)
        return [schemas.SandboxMetric(timestamp=iso(r.ts), timestampUnix=int(r.ts), cpuCount=r.cpu_count,
                                      cpuUsedPct=r.cpu_used_pct, memUsed=r.mem_used, memTotal=r.mem_total,
                                      memCache=r.mem_cache, diskUsed=r.disk_used, diskTotal=r.disk_total)
                for r in rows]

    # Before branching's `DELETE /templates/{id:path}`, which would take `DELETE /templates/tags`.
    app.include_router(template_routes(lambda: plane.templates))
    app.include_router(branching_routes(plane, paths))
    app.include_router(observability_routes(plane, paths))
    app.include_router(secrets_routes(lambda: getattr(plane, "secrets", None)))
    app.include_router(volume_routes(lambda: getattr(plane, "volumes", None), lambda: plane.public_domain))
    app.include_router(recording_routes(lambda: getattr(plane, "recordings", None)))
    app.include_router(webhook_routes(lambda: plane))
    app.include_router(usage_routes(lambda: plane.meter))
    # The web dashboard (docs/dashboard.md): its own session sign-in and scope checks, outside the schema.
    app.mount("/dashboard", create_dashboard(plane, keys, paths))
    return app
