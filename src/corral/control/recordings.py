"""Recordings of a desktop sandbox's screen (docs/desktop.md): an MP4 that ffmpeg (x11grab) writes inside
the sandbox while it records, and that the host keeps once it is stopped.

- Start: ffmpeg runs in the sandbox as root, under /var/lib/corral/recordings, with the length and size
  bounds given to ffmpeg itself (`-t`, `-fs`), so a recording nobody stops ends on its own. The MP4 is
  fragmented (a fragment every two seconds): whatever happens to the sandbox, what was written plays.
  The sandbox is kept awake meanwhile (the idle policy would freeze a still screen's recorder).
- Pause and resume: ffmpeg is one of the sandbox's processes, checkpointed and restored with it; the
  recording goes on after the resume (the paused time is not in it).
- Stop: ffmpeg is interrupted (it finishes the file), the file is copied to the host
  (`<data>/recordings/<id>.mp4`) through envd and removed from the sandbox; from then on it is
  downloadable, whatever becomes of the sandbox.
- When the sandbox is killed (or its timeout kills it), a recording that is running is stopped and
  collected first if it is kept (`keep`), and every recording not kept goes with the sandbox. A kept
  recording stays until deleted. A recording still running in a sandbox that is killed while paused
  cannot be collected and is dropped (stop it before pausing to be sure of it).
- One recording at a time per sandbox; at most `max_per_owner` recordings stored per owner (API key).
"""

from __future__ import annotations

import contextlib
import logging
import secrets as random
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from corral.control.db import Database, RecordingRow
from corral.control.errors import ApiError
from corral.control.keys import Owner
from corral.control.sandboxes import Sandboxes
from corral.runtime.base import RuntimeError_

log = logging.getLogger("corral.recordings")

SANDBOX_DIR = "/var/lib/corral/recordings"
MAX_FPS = 30


@dataclass(frozen=True)
class RecordingLimits:
    max_seconds: int = 3600
    max_bytes: int = 512 << 20
    max_per_owner: int = 100


# $1 display, $2 fps, $3 seconds, $4 bytes, $5 id. Exit codes: 10 no ffmpeg, 11 no X display, 12 ffmpeg
# ended at once (its log follows).
_START = f"""
command -v ffmpeg >/dev/null || exit 10
xdpyinfo -display "$1" >/dev/null 2>&1 || exit 11
mkdir -p -m 0700 {SANDBOX_DIR} && cd {SANDBOX_DIR} || exit 1
size=$(xdpyinfo -display "$1" | awk '/dimensions:/ {{ print $2; exit }}')
setsid ffmpeg -nostdin -loglevel error -f x11grab -draw_mouse 1 -framerate "$2" -video_size "$size" -i "$1" \\
    -t "$3" -fs "$4" -vf 'scale=trunc(iw/2)*2:trunc(ih/2)*2' \\
    -c:v libx264 -preset ultrafast -tune zerolatency -pix_fmt yuv420p -g "$(($2 * 2))" \\
    -movflags +frag_keyframe+empty_moov+default_base_moof -f mp4 "$5.mp4" \\
    </dev/null >"$5.log" 2>&1 &
echo $! > "$5.pid"
# Answered once ffmpeg writes its file (the X display opened, the encoder started): what the caller does
# after the answer is on the recording (on a busy host that took 2 s after the start, and a test saw them lost).
for _ in $(seq 100); do
    [ -s "$5.mp4" ] && break
    kill -0 "$(cat "$5.pid")" 2>/dev/null || {{ tail -c 2000 "$5.log"; exit 12; }}
    sleep 0.05
done
kill -0 "$(cat "$5.pid")" 2>/dev/null || {{ tail -c 2000 "$5.log"; exit 12; }}
echo "$size"
"""

# $1 id. Prints the file's size and its duration in seconds; exit 13 when there is no file.
_STOP = f"""
cd {SANDBOX_DIR} 2>/dev/null || exit 13
pid=$(cat "$1.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -INT "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
fi
[ -s "$1.mp4" ] || {{ tail -c 2000 "$1.log" 2>/dev/null; exit 13; }}
sync
stat -c %s "$1.mp4"
ffprobe -v error -show_entries format=duration -of csv=p=0 "$1.mp4" 2>/dev/null || echo 0
"""

_DROP = f"""
cd {SANDBOX_DIR} 2>/dev/null || exit 0
for pidfile in *.pid; do [ -f "$pidfile" ] && kill -KILL "$(cat "$pidfile")" 2>/dev/null; done
rm -f ./*
"""


class Recordings:
    def __init__(self, database: Database, sandboxes: Sandboxes, directory: Path,
                 limits: RecordingLimits = RecordingLimits()) -> None:
        self._db = database
        self._sandboxes = sandboxes
        self._orchestrator = sandboxes.orchestrator
        self.directory = directory
        self.limits = limits

    async def open(self) -> None:
        """At start-up: files of recordings that have no row (a crash between the two) go; sandboxes with a
        recording running are kept awake again."""
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = await self._db.read(lambda session: list(session.scalars(select(RecordingRow))))
        known = {row.id for row in rows}
        for path in self.directory.glob("*.mp4*"):
            if path.name.split(".")[0] not in known:
                path.unlink(missing_ok=True)
        for row in rows:
            if row.state == "recording":
                self._orchestrator.keep_awake(row.sandbox_id)

    def path_of(self, row: RecordingRow) -> Path:
        return self.directory / f"{row.id}.mp4"

    # --- start and stop --------------------------------------------------------------------------------

    async def start(self, owner: Owner, sandbox_id: str, *, fps: int = 10, max_seconds: int | None = None,
                    max_bytes: int | None = None, keep: bool = False, display: str = ":0") -> RecordingRow:
        row = await self._sandboxes.get(owner, sandbox_id)
        if not 1 <= fps <= MAX_FPS:
            raise ApiError(400, f"fps must be between 1 and {MAX_FPS}, got {fps}")
        seconds = self._bounded("maxDurationSeconds", max_seconds, self.limits.max_seconds)
        size = self._bounded("maxBytes", max_bytes, self.limits.max_bytes)
        if not display.startswith(":") or not display[1:].replace(".", "").isdigit():
            raise ApiError(400, f"display must look like ':0', got {display!r}")
        # The sandbox's lock: no pause, resume or kill while its recorder starts or stops.
        async with self._sandboxes.locks[sandbox_id]:
            row = await self._sandboxes.get(owner, sandbox_id)
            if row.state != "running" or self._orchestrator.runtime_id(sandbox_id) is None:
                raise ApiError(409, f"sandbox {sandbox_id} is paused: resume it to record its screen")
            stored = await self._db.read(lambda session: list(session.scalars(
                select(RecordingRow).where(RecordingRow.team_id == owner.team_id))))
            if any(r.sandbox_id == sandbox_id and r.state == "recording" for r in stored):
                raise ApiError(409, f"sandbox {sandbox_id} is being recorded already: stop that recording first")
            if len(stored) >= self.limits.max_per_owner:
                raise ApiError(409, f"this key has {len(stored)} recordings stored, the most allowed: delete "
                                    "some to record more")
            recording_id = "rec_" + random.token_hex(8)
            result = await self._run(sandbox_id, ["/bin/sh", "-c", _START, "start", display, str(fps),
                                                  str(seconds), str(size), recording_id], timeout=30)
            if result.exit_code == 10:
                raise ApiError(409, "this sandbox has no ffmpeg: recordings need a desktop sandbox (template "
                                    "`desktop`, or a template with ffmpeg and an X server)")
            if result.exit_code == 11:
                raise ApiError(409, f"this sandbox has no X display {display} to record: start the desktop "
                                    "first (e2b-desktop's Sandbox.create does)")
            if result.exit_code != 0:
                detail = (result.stdout + result.stderr).decode(errors="replace").strip()[-500:]
                raise ApiError(500, f"the recorder did not start: {detail or f'exit code {result.exit_code}'}")
            width, _, height = result.stdout.decode().strip().rpartition("\n")[2].partition("x")
            recording = RecordingRow(id=recording_id, key_id=owner.key_id, team_id=owner.team_id,
                                     sandbox_id=sandbox_id, state="recording",
                                     keep=keep, fps=fps, max_seconds=seconds, max_bytes=size,
                                     width=int(width or 0), height=int(height or 0), started_at=time.time())
            await self._db.write(lambda session: session.add(recording))
            self._orchestrator.keep_awake(sandbox_id)
            return recording

    def _bounded(self, name: str, asked: int | None, limit: int) -> int:
        if asked is None:
            return limit
        if not 1 <= asked <= limit:
            raise ApiError(400, f"{name} must be between 1 and {limit} (this server's limit), got {asked}")
        return asked

    async def stop(self, owner: Owner, recording_id: str) -> RecordingRow:
        row = await self.get(owner, recording_id)
        async with self._sandboxes.locks[row.sandbox_id]:
            row = await self.get(owner, recording_id)
            if row.state != "recording":
                return row  # stopped already: stopping again changes nothing
            sandbox = await self._sandboxes.row(row.sandbox_id)
            if sandbox is not None and sandbox.state != "running":
                raise ApiError(409, f"sandbox {row.sandbox_id} is paused: resume it to stop its recording")
            return await self._collect(row)

    async def _collect(self, row: RecordingRow) -> RecordingRow:
        """Ends the recorder and copies its file to the host; the row as it is now (`ready` or `failed`)."""
        state, error, size, duration = "failed", None, 0, 0.0
        destination = self.path_of(row)
        partial = destination.with_suffix(".mp4.part")
        try:
            result = await self._run(row.sandbox_id, ["/bin/sh", "-c", _STOP, "stop", row.id], timeout=60)
            if result.exit_code != 0:
                detail = (result.stdout + result.stderr).decode(errors="replace").strip()[-500:]
                error = f"the recorder left no file: {detail or f'exit code {result.exit_code}'}"
            else:
                _, duration_text = result.stdout.decode().split()[:2]
                size = await self._orchestrator.download(row.sandbox_id, f"{SANDBOX_DIR}/{row.id}.mp4", partial,
                                                         max_bytes=row.max_bytes + (1 << 20))
                partial.rename(destination)
                duration = float(duration_text) if duration_text.replace(".", "").isdigit() else 0.0
                state = "ready"
                with contextlib.suppress(ApiError):
                    await self._run(row.sandbox_id, ["/bin/sh", "-c", f'rm -f {SANDBOX_DIR}/"$1".*', "rm", row.id],
                                    timeout=10)
        except (ApiError, RuntimeError_, OSError, ValueError) as e:
            error = f"the recording could not be collected: {e}"
        finally:
            partial.unlink(missing_ok=True)
        if state != "ready":
            log.warning("recording %s of %s: %s", row.id, row.sandbox_id, error)

        def finish(session: Session) -> RecordingRow | None:
            current = session.get(RecordingRow, row.id)
            if current is not None:
                current.state, current.error, current.size_bytes = state, error, size
                current.duration_s, current.stopped_at = duration, time.time()
            return current

        updated = await self._db.write(finish)
        self._orchestrator.keep_awake(row.sandbox_id, False)
        if updated is None:  # deleted meanwhile
            destination.unlink(missing_ok=True)
            raise ApiError(404, f"recording {row.id} was deleted")
        return updated

    async def _run(self, sandbox_id: str, argv: list[str], *, timeout: float):
        try:
            return await self._orchestrator.run(sandbox_id, argv, timeout=timeout)
        except RuntimeError_ as e:
            raise ApiError(409, f"sandbox {sandbox_id} is not running: {e}") from e

    # --- reading and deleting --------------------------------------------------------------------------

    async def get(self, owner: Owner, recording_id: str) -> RecordingRow:
        row = await self._db.read(lambda session: session.get(RecordingRow, recording_id))
        if row is None or row.team_id != owner.team_id:
            raise ApiError(404, f"recording {recording_id} not found")
        return row

    async def list(self, owner: Owner, sandbox_id: str | None = None) -> list[RecordingRow]:
        stmt = select(RecordingRow).where(RecordingRow.team_id == owner.team_id)
        if sandbox_id is not None:
            stmt = stmt.where(RecordingRow.sandbox_id == sandbox_id)
        return await self._db.read(lambda session: list(session.scalars(stmt.order_by(RecordingRow.started_at))))

    async def file(self, owner: Owner, recording_id: str) -> Path:
        row = await self.get(owner, recording_id)
        if row.state == "recording":
            raise ApiError(409, f"recording {recording_id} is still running: stop it first")
        path = self.path_of(row)
        if row.state != "ready" or not path.is_file():
            raise ApiError(409, f"recording {recording_id} has no file: {row.error or 'it failed'}")
        return path

    async def set_keep(self, owner: Owner, recording_id: str, keep: bool) -> RecordingRow:
        await self.get(owner, recording_id)

        def update(session: Session) -> RecordingRow:
            current = session.get(RecordingRow, recording_id)
            current.keep = keep
            return current

        return await self._db.write(update)

    async def delete(self, owner: Owner, recording_id: str) -> None:
        row = await self.get(owner, recording_id)
        if row.state == "recording":
            raise ApiError(409, f"recording {recording_id} is still running: stop it first")
        await self._db.write(lambda session: session.execute(delete(RecordingRow).where(RecordingRow.id == row.id)))
        self.path_of(row).unlink(missing_ok=True)

    async def recording(self, sandbox_id: str) -> bool:
        """Whether a recording of the sandbox is running."""
        return bool(await self._db.read(lambda session: session.scalar(select(RecordingRow.id).where(
            RecordingRow.sandbox_id == sandbox_id, RecordingRow.state == "recording"))))

    async def drop_inherited(self, sandbox_id: str) -> None:
        """A fork of a sandbox that was being recorded has a copy of the recorder that nobody can stop (the
        recording is its source's): it is ended, and its file removed."""
        with contextlib.suppress(ApiError):
            await self._run(sandbox_id, ["/bin/sh", "-c", _DROP], timeout=30)

    # --- the sandbox ends --------------------------------------------------------------------------------

    async def sandbox_ending(self, sandbox_id: str) -> None:
        """Before the sandbox is destroyed (its lock held): kept recordings that run are collected; the
        others go."""
        rows = await self._db.read(lambda session: list(session.scalars(
            select(RecordingRow).where(RecordingRow.sandbox_id == sandbox_id))))
        if not rows:
            return
        running = self._orchestrator.runtime_id(sandbox_id) is not None
        for row in rows:
            if row.keep and row.state == "recording":
                if running:
                    with contextlib.suppress(ApiError):  # deleted meanwhile
                        await self._collect(row)
                else:
                    await self._db.write(lambda session, rid=row.id: _mark_lost(session, rid))
        dropped = [row for row in rows if not row.keep]
        await self._db.write(lambda session: session.execute(
            delete(RecordingRow).where(RecordingRow.id.in_([row.id for row in dropped]))))
        for row in dropped:
            self.path_of(row).unlink(missing_ok=True)
        self._orchestrator.keep_awake(sandbox_id, False)


def _mark_lost(session: Session, recording_id: str) -> None:
    row = session.get(RecordingRow, recording_id)
    if row is not None:
        row.state, row.stopped_at = "failed", time.time()
        row.error = "the sandbox was killed while paused, with the recording running: nothing could be collected"
