"""Template routes of the E2B API (Build System 2.0): request a build, upload COPY files, trigger, poll status
and logs, names, tags, list, delete. Exact status codes and keys: ../shared docs e2b-protocol-2.md §0, §1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from corral.control.api_common import ERRORS, Key, iso
from corral.control.errors import ApiError
from corral.control.templates import DEFAULT_TAG, Templates


class NewTemplate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, description="`[namespace/]name[:tag]`; the tag is added to `tags`.")
    alias: str | None = Field(None, description="Deprecated synonym of `name`.")
    tags: list[str] | None = None
    cpuCount: int | None = Field(None, ge=1, le=64)
    memoryMB: int | None = Field(None, ge=128)
    minFreeDiskMb: int | None = Field(None, ge=0)


class TemplateRequested(BaseModel):
    templateID: str
    buildID: str
    public: bool
    names: list[str]
    tags: list[str]
    aliases: list[str]


class FileUpload(BaseModel):
    present: bool
    url: str | None = None


class LogEntry(BaseModel):
    timestamp: str
    level: str
    message: str
    step: str | None = None


class BuildReason(BaseModel):
    message: str
    step: str | None = None


class BuildStatus(BaseModel):
    templateID: str
    buildID: str
    status: str = Field(description="waiting | building | ready | error")
    logs: list[str]
    logEntries: list[LogEntry]
    reason: BuildReason | None = None


class AliasAnswer(BaseModel):
    templateID: str
    public: bool


class AssignTags(BaseModel):
    target: str = Field(description="`name:tag` (or `name`: its default build) whose build the tags point to.")
    tags: list[str]


class RemoveTags(BaseModel):
    name: str
    tags: list[str]


class AssignedTags(BaseModel):
    tags: list[str]
    buildID: str


class TemplateTag(BaseModel):
    tag: str
    buildID: str
    createdAt: str


class TemplateListed(BaseModel):
    templateID: str
    buildID: str | None
    cpuCount: int
    memoryMB: int
    diskSizeMB: int
    public: bool
    aliases: list[str]
    names: list[str]
    createdAt: str
    updatedAt: str
    buildCount: int
    buildStatus: str | None
    tags: list[str]


def _page(entries: list[dict]) -> list[LogEntry]:
    return [LogEntry(timestamp=iso(e["timestamp"]), level=e["level"], message=e["message"], step=e.get("step"))
            for e in entries]


def template_routes(templates: Callable[[], Templates]) -> APIRouter:
    """`templates()`: the plane's (None on a server that builds none: 501)."""

    def of() -> Templates:
        found = templates()
        if found is None:
            raise ApiError(501, "this server builds no templates")
        return found

    router = APIRouter(tags=["templates"])

    @router.post("/v3/templates", status_code=202, response_model=TemplateRequested, responses=ERRORS)
    async def request_build(body: NewTemplate, key: Key) -> TemplateRequested:
        name = body.name or body.alias
        if not name:
            raise ApiError(400, "name is required")
        row, build = await of().request(key.owner, name, body.tags, cpu_count=body.cpuCount,
                                               memory_mb=body.memoryMB)
        return TemplateRequested(templateID=row.id, buildID=build.id, public=row.public,
                                 names=[row.name], tags=list(build.tags), aliases=[row.name])

    @router.post("/templates", status_code=400, responses=ERRORS, tags=["templates (legacy)"])
    async def legacy_request(key: Key) -> Response:
        raise ApiError(400, "Dockerfile builds through a registry push (the v1 flow) are not supported: build "
                            "with the Template SDK (`Template.build`), `e2b template create`, or `corral "
                            "template build --dockerfile PATH --name NAME`")

    @router.get("/templates/{template_id}/files/{files_hash}", status_code=201, response_model=FileUpload,
                response_model_exclude_none=True, responses=ERRORS)
    async def upload_slot(template_id: str, files_hash: str, key: Key, request: Request) -> FileUpload:
        return FileUpload(**await of().upload_slot(key.owner, template_id, files_hash, str(request.base_url)))

    @router.put("/templates/{template_id}/files/{files_hash}/upload", status_code=201, responses=ERRORS,
                description="The self-authorising upload URL `GET …/files/{hash}` hands out (no API key).")
    async def upload(template_id: str, files_hash: str, request: Request,
                     expires: Annotated[str, Query()] = "", signature: Annotated[str, Query()] = "") -> Response:
        await of().receive_upload(template_id, files_hash, expires, signature, request.stream())
        return Response(status_code=201)

    @router.post("/v2/templates/{template_id}/builds/{build_id}", status_code=202, responses=ERRORS)
    async def trigger(template_id: str, build_id: str, key: Key, request: Request,
                      body: Annotated[dict[str, Any], Body()]) -> Response:
        await of().trigger(key.owner, template_id, build_id, body, client=request.headers.get("user-agent", ""))
        return Response(status_code=202)

    # Absent, never null: the SDK parses a present `reason` or `step` even when it is null.
    @router.get("/templates/{template_id}/builds/{build_id}/status", response_model=BuildStatus,
                response_model_exclude_none=True, responses=ERRORS)
    async def build_status(template_id: str, build_id: str, key: Key,
                           logsOffset: Annotated[int, Query(ge=0)] = 0,
                           limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                           level: Annotated[str | None, Query()] = None) -> BuildStatus:
        build = await of().build_row(key.owner, template_id, build_id)
        answer = of().status(build, logsOffset, limit, level)
        answer["logEntries"] = _page(answer["logEntries"])
        return BuildStatus(**answer)

    @router.get("/templates/aliases/{alias:path}", response_model=AliasAnswer, responses=ERRORS)
    async def alias(alias: str, key: Key) -> AliasAnswer:
        row = await of().exists(key.owner, alias)
        if row is None:
            return AliasAnswer(templateID=alias.partition(":")[0], public=True)
        return AliasAnswer(templateID=row.id, public=row.public)

    @router.post("/templates/tags", status_code=201, response_model=AssignedTags, responses=ERRORS)
    async def assign_tags(body: AssignTags, key: Key) -> AssignedTags:
        tags, build_id = await of().assign_tags(key.owner, body.target, body.tags)
        return AssignedTags(tags=tags, buildID=build_id)

    @router.delete("/templates/tags", status_code=204, responses=ERRORS)
    async def remove_tags(body: RemoveTags, key: Key) -> Response:
        await of().remove_tags(key.owner, body.name, body.tags)
        return Response(status_code=204)

    @router.get("/templates/{ref:path}/tags", response_model=list[TemplateTag], responses=ERRORS)
    async def list_tags(ref: str, key: Key) -> list[TemplateTag]:
        return [TemplateTag(tag=t.tag, buildID=t.build_id, createdAt=iso(t.created_at))
                for t in await of().tags(key.owner, ref)]

    @router.get("/templates", response_model=list[TemplateListed], responses=ERRORS)
    async def list_templates(key: Key) -> list[TemplateListed]:
        out = []
        for row, builds, tags in await of().list(key.owner):
            default = next((t.build_id for t in tags if t.tag == DEFAULT_TAG), None)
            current = next((b for b in builds if b.id == default), builds[-1] if builds else None)
            out.append(TemplateListed(
                templateID=row.id, buildID=current.id if current else None,
                cpuCount=current.cpu_count if current else 2, memoryMB=current.memory_mb if current else 1024,
                diskSizeMB=0, public=row.public, aliases=[row.name], names=[row.name], createdAt=iso(row.created_at),
                updatedAt=iso(row.updated_at), buildCount=len(builds),
                buildStatus=builds[-1].status if builds else None, tags=sorted(t.tag for t in tags)))
        return out

    return router

