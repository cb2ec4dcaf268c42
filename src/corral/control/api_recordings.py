"""Routes for recordings of desktop sandboxes (control/recordings.py, docs/desktop.md): a Corral extension,
in the style of E2B's API (camelCase, the API key in X-API-Key).

    POST   /sandboxes/{sandboxID}/recordings      start one (201)
    GET    /sandboxes/{sandboxID}/recordings      the sandbox's recordings
    GET    /recordings                            all of the key's (those kept after their sandbox too)
    GET    /recordings/{recordingID}              one
    POST   /recordings/{recordingID}/stop         stop it and keep its file on the server
    GET    /recordings/{recordingID}/file         the MP4 (byte ranges allowed)
    PATCH  /recordings/{recordingID}              {"keep": true}: outlive the sandbox
    DELETE /recordings/{recordingID}              (204)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.control.api_common import ERRORS, Key, iso
from corral.control.db import RecordingRow
from corral.control.errors import ApiError
from corral.control.recordings import MAX_FPS, Recordings

_ERRORS = {**ERRORS, 409: ERRORS[404]}


class NewRecording(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fps: int = Field(default=10, ge=1, le=MAX_FPS, description="Frames per second")
    maxDurationSeconds: int | None = Field(default=None, ge=1, description=(
        "The recording ends on its own after this long; at most the server's limit (CORRAL_RECORDING_MAX_S), "
        "which is also the default"))
    maxBytes: int | None = Field(default=None, ge=1, description=(
        "... or once its file is this large; at most the server's limit (CORRAL_RECORDING_MAX_MB)"))
    keep: bool = Field(default=False, description="Keep the recording after the sandbox is killed (otherwise "
                                                  "it goes with the sandbox)")
    display: str = Field(default=":0", description="The X display to record")


class RecordingUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep: bool


class Recording(BaseModel):
    recordingID: str
    sandboxID: str
    state: Literal["recording", "ready", "failed"] = Field(description=(
        "recording: the recorder runs (it may have reached its limits); ready: stopped, the file is on the "
        "server; failed: see `error`"))
    keep: bool
    fps: int
    width: int
    height: int
    maxDurationSeconds: int
    maxBytes: int
    startedAt: str
    stoppedAt: str | None = None
    sizeBytes: int = Field(description="The file's size once stopped")
    durationSeconds: float = Field(description="The video's duration (ffprobe) once stopped")
    error: str | None = None


def _answer(row: RecordingRow) -> Recording:
    return Recording(recordingID=row.id, sandboxID=row.sandbox_id, state=row.state, keep=row.keep, fps=row.fps,
                     width=row.width, height=row.height, maxDurationSeconds=row.max_seconds,
                     maxBytes=row.max_bytes, startedAt=iso(row.started_at),
                     stoppedAt=iso(row.stopped_at) if row.stopped_at else None, sizeBytes=row.size_bytes,
                     durationSeconds=row.duration_s, error=row.error)


def recording_routes(recordings: Callable[[], Recordings | None]) -> APIRouter:
    router = APIRouter(tags=["recordings"])

    def service() -> Recordings:
        found = recordings()
        if found is None:
            raise ApiError(501, "this server does not record desktops")
        return found

    @router.post("/sandboxes/{sandbox_id}/recordings", status_code=201, response_model=Recording,
                 responses=_ERRORS)
    async def start_recording(sandbox_id: str, key: Key, body: NewRecording | None = None) -> Recording:
        """Starts recording the sandbox's screen to an MP4 (ffmpeg x11grab inside the sandbox). 409 when the
        sandbox is paused, has no X display or no ffmpeg, or is being recorded already."""
        body = body or NewRecording()
        return _answer(await service().start(key.owner, sandbox_id, fps=body.fps, max_seconds=body.maxDurationSeconds,
                                             max_bytes=body.maxBytes, keep=body.keep, display=body.display))

    @router.get("/sandboxes/{sandbox_id}/recordings", response_model=list[Recording], responses=ERRORS)
    async def sandbox_recordings(sandbox_id: str, key: Key) -> list[Recording]:
        return [_answer(row) for row in await service().list(key.owner, sandbox_id)]

    @router.get("/recordings", response_model=list[Recording], responses=ERRORS)
    async def all_recordings(key: Key) -> list[Recording]:
        return [_answer(row) for row in await service().list(key.owner)]

    @router.get("/recordings/{recording_id}", response_model=Recording, responses=ERRORS)
    async def get_recording(recording_id: str, key: Key) -> Recording:
        return _answer(await service().get(key.owner, recording_id))

    @router.post("/recordings/{recording_id}/stop", response_model=Recording, responses=_ERRORS)
    async def stop_recording(recording_id: str, key: Key) -> Recording:
        """Stops the recorder and copies the file to the server; stopping a stopped recording answers it as
        it is. 409 while its sandbox is paused."""
        return _answer(await service().stop(key.owner, recording_id))

    @router.get("/recordings/{recording_id}/file", response_class=FileResponse, responses={
        **_ERRORS, 200: {"content": {"video/mp4": {}}, "description": "The recording (MP4, H.264)"}})
    async def recording_file(recording_id: str, key: Key) -> FileResponse:
        path = await service().file(key.owner, recording_id)
        return FileResponse(path, media_type="video/mp4", filename=f"{recording_id}.mp4")

    @router.patch("/recordings/{recording_id}", response_model=Recording, responses=ERRORS)
    async def update_recording(recording_id: str, key: Key, body: RecordingUpdate) -> Recording:
        return _answer(await service().set_keep(key.owner, recording_id, body.keep))

    @router.delete("/recordings/{recording_id}", status_code=204, responses=_ERRORS)
    async def delete_recording(recording_id: str, key: Key) -> Response:
        await service().delete(key.owner, recording_id)
        return Response(status_code=204)

    return router
