"""Routes for volumes: the control plane (E2B's `/volumes`, with the API key) and the content plane
(`/volumecontent/{id}/...`, with the volume's own token as `Authorization: Bearer`). Content errors are
`{"code": "<string>", "message"}` as the SDK's volume client parses them; a bearer that is not the
volume's token gets 401 whether or not the volume exists."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.control.api_common import ERRORS, Key
from corral.control.errors import ApiError
from corral.control.volumes import VolumeInfo, Volumes
from corral.observability.logs import request_id
from corral.storage.volume_files import VolumeFiles, VolumePathError

_ERRORS = {**ERRORS, 409: ERRORS[404]}


class NewVolume(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="1-128 letters, digits, '_' or '-'; unique per API key")
    sizeMB: int | None = Field(default=None, description="Corral extension: the volume's fixed size (its quota); "
                                                         "the server's default when left out")


class Volume(BaseModel):
    volumeID: str
    name: str


class VolumeAndToken(Volume):
    token: str = Field(description="Bearer token for this volume's content API")
    domain: str | None = None
    sizeMB: int = Field(description="Corral extension: the volume's size")


class VolumeContentError(BaseModel):
    code: str
    message: str


def _answer(info: VolumeInfo, token: str, domain: str | None) -> VolumeAndToken:
    return VolumeAndToken(volumeID=info.id, name=info.name, token=token, domain=domain, sizeMB=info.size_mb)


def _content_error(e: VolumePathError) -> JSONResponse:
    return JSONResponse({"code": e.code, "message": e.message, "requestID": request_id.get()}, status_code=e.status)


def _int(request: Request, name: str, *, octal_ok: bool = False) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw, 0) if octal_ok and raw.startswith("0o") else int(raw)
    except ValueError:
        raise VolumePathError(400, "bad_request", f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise VolumePathError(400, "bad_request", f"{name} must not be negative")
    return value


def _flag(request: Request, name: str) -> bool:
    raw = (request.query_params.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise VolumePathError(400, "bad_request", f"{name} must be true or false, got {raw!r}")
    return raw in ("true", "1")


def _path(request: Request) -> str:
    path = request.query_params.get("path")
    if path is None:
        raise VolumePathError(400, "bad_request", "the path query parameter is required")
    return path


_CONTENT = {401: {"model": VolumeContentError}, 404: {"model": VolumeContentError},
            400: {"model": VolumeContentError}, 409: {"model": VolumeContentError},
            507: {"model": VolumeContentError, "description": "the volume is full"}}


def volume_routes(store: Callable[[], Volumes | None], domain: Callable[[], str | None]) -> APIRouter:
    """`store`: the plane's volumes (None on a server without them: 501); `domain`: the public domain
    the content API is reached under (`api.<domain>`), if any."""
    router = APIRouter(tags=["volumes"])

    def volumes_of() -> Volumes:
        found = store()
        if found is None:
            raise ApiError(501, "this server keeps no volumes")
        return found

    @router.post("/volumes", status_code=201, response_model=VolumeAndToken, responses=_ERRORS)
    async def create(body: NewVolume, key: Key) -> VolumeAndToken:
        return _answer(*await volumes_of().create(key.owner, body.name, body.sizeMB), domain())

    @router.get("/volumes", response_model=list[Volume], responses=_ERRORS)
    async def list_volumes(key: Key) -> list[Volume]:
        return [Volume(volumeID=v.id, name=v.name) for v in await volumes_of().list(key.owner)]

    @router.get("/volumes/{volume}", response_model=VolumeAndToken, responses=_ERRORS)
    async def get(volume: str, key: Key) -> VolumeAndToken:
        """`volume`: its id or its name."""
        return _answer(*await volumes_of().get(key.owner, volume), domain())

    @router.delete("/volumes/{volume}", status_code=204, responses=_ERRORS)
    async def delete(volume: str, key: Key) -> Response:
        """Deletes the volume and its files; 409 while a running or paused sandbox mounts it."""
        await volumes_of().delete(key.owner, volume)
        return Response(status_code=204)

    # --- content ---------------------------------------------------------------------------------

    async def files_of(volume_id: str, request: Request) -> VolumeFiles:
        found = store()
        if found is None:
            raise VolumePathError(501, "not_implemented", "this server keeps no volumes")
        return await found.files(volume_id, request.headers.get("authorization"))

    @router.get("/volumecontent/{volume_id}/path", responses=_CONTENT, tags=["volume content"])
    async def stat_path(volume_id: str, request: Request) -> Response:
        """The entry at `path` (a symlink as itself)."""
        try:
            files = await files_of(volume_id, request)
            return JSONResponse((await asyncio.to_thread(files.stat, _path(request))).to_json())
        except VolumePathError as e:
            return _content_error(e)

    @router.get("/volumecontent/{volume_id}/dir", responses=_CONTENT, tags=["volume content"])
    async def list_dir(volume_id: str, request: Request) -> Response:
        """The entries of the directory at `path`, `depth` levels down (1: only its own)."""
        try:
            files = await files_of(volume_id, request)
            depth = _int(request, "depth") or 1
            entries = await asyncio.to_thread(files.list, _path(request), depth)
            return JSONResponse([e.to_json() for e in entries])
        except VolumePathError as e:
            return _content_error(e)

    @router.post("/volumecontent/{volume_id}/dir", status_code=201, responses=_CONTENT, tags=["volume content"])
    async def make_dir(volume_id: str, request: Request) -> Response:
        """A directory at `path`; `force`: its parents too, and an existing directory is no error."""
        try:
            files = await files_of(volume_id, request)
            made = await asyncio.to_thread(files.make_dir, _path(request), uid=_int(request, "uid"),
                                           gid=_int(request, "gid"), mode=_int(request, "mode"),
                                           force=_flag(request, "force"))
            return JSONResponse(made.to_json(), status_code=201)
        except VolumePathError as e:
            return _content_error(e)

    @router.get("/volumecontent/{volume_id}/file", responses=_CONTENT, tags=["volume content"])
    async def read_file(volume_id: str, request: Request) -> Response:
        """The bytes of the file at `path`."""
        try:
            files = await files_of(volume_id, request)
            fd = await asyncio.to_thread(files.open_for_reading, _path(request))
        except VolumePathError as e:
            return _content_error(e)
        chunks = files.read_chunks(fd)

        async def body() -> AsyncIterator[bytes]:
            try:
                while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                    yield chunk
            finally:
                chunks.close()

        return StreamingResponse(body(), media_type="application/octet-stream")

    @router.put("/volumecontent/{volume_id}/file", status_code=201, responses=_CONTENT, tags=["volume content"])
    async def write_file(volume_id: str, request: Request) -> Response:
        """Writes the body to the file at `path` (its directory must exist); an existing file is replaced
        only with `force=true`. The file appears whole or not at all."""
        try:
            files = await files_of(volume_id, request)
            uid, gid, mode = _int(request, "uid"), _int(request, "gid"), _int(request, "mode")
            path, parent, fd, temporary = await asyncio.to_thread(files.begin_write, _path(request),
                                                                  force=_flag(request, "force"))
        except VolumePathError as e:
            return _content_error(e)
        try:
            async for chunk in request.stream():
                if chunk:
                    await asyncio.to_thread(files.write_chunk, fd, chunk, path)
        except BaseException as e:
            await asyncio.to_thread(files.abort_write, parent, fd, temporary)
            os.close(parent)
            if isinstance(e, VolumePathError):
                return _content_error(e)
            raise
        try:
            written = await asyncio.to_thread(files.commit_write, path, parent, fd, temporary, uid=uid, gid=gid,
                                              mode=mode)
        except VolumePathError as e:
            return _content_error(e)
        return JSONResponse(written.to_json(), status_code=201)

    @router.patch("/volumecontent/{volume_id}/path", responses=_CONTENT, tags=["volume content"])
    async def update(volume_id: str, request: Request) -> Response:
        """Changes the owner and mode of the entry at `path`: a JSON body of `uid`, `gid`, `mode`."""
        try:
            files = await files_of(volume_id, request)
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                raise VolumePathError(400, "bad_request", "the body must be JSON") from None
            if not isinstance(body, dict) or any(
                    not (body.get(k) is None or (isinstance(body[k], int) and body[k] >= 0))
                    for k in ("uid", "gid", "mode")):
                raise VolumePathError(400, "bad_request", "uid, gid and mode must be non-negative integers")
            changed = await asyncio.to_thread(files.update, _path(request), uid=body.get("uid"),
                                              gid=body.get("gid"), mode=body.get("mode"))
            return JSONResponse(changed.to_json())
        except VolumePathError as e:
            return _content_error(e)

    @router.delete("/volumecontent/{volume_id}/path", status_code=204, responses=_CONTENT,
                   tags=["volume content"])
    async def remove(volume_id: str, request: Request) -> Response:
        """Removes the entry at `path`, a directory with everything in it."""
        try:
            files = await files_of(volume_id, request)
            await asyncio.to_thread(files.remove, _path(request))
            return Response(status_code=204)
        except VolumePathError as e:
            return _content_error(e)

    return router
