"""Checkpoints of a live gVisor container: memory image and filesystem layer of one instant, written aside
and renamed into place, and the source's resume in the background afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from corral.runtime.base import (
    CheckpointInvalid,
    CheckpointRefused,
    ContainerState,
    InsufficientResources,
    SandboxFailed,
)
from corral.runtime.gvisor import snapshots
from corral.runtime.gvisor.containers import Container
from corral.runtime.gvisor.runsc import RunscError
from corral.runtime.gvisor.snapshots import GVisorSnapshot

if TYPE_CHECKING:
    from corral.runtime.gvisor.runtime import GVisorRuntime

log = logging.getLogger(__name__)
S = ContainerState


async def checkpoint(rt: GVisorRuntime, c: Container, directory: Path, *, leave_running: bool,
                     memory: bool) -> GVisorSnapshot:
    sandbox_id = c.id
    await rt._settle(c)
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointInvalid(f"checkpoint directory {directory} is not empty")
    if not memory and not c.command:
        raise CheckpointInvalid(f"sandbox {sandbox_id} has no recorded start command: it cannot be cold-booted "
                                "from a filesystem-only checkpoint (rebuild its template)")
    with rt._awake(c):
        if not memory:
            # Dirty file data may still sit in the sandbox kernel's page cache; a memory image would keep
            # it, a filesystem-only checkpoint must have it on disk.
            await rt.exec(sandbox_id, ["/bin/sync"], timeout=60)
        rt.table.move(c, S.CHECKPOINTING)
        try:
            await _write(rt, c, directory, memory)
        finally:
            if c.state is S.CHECKPOINTING:
                rt.table.move(c, S.LIVE)
    if leave_running:
        _resume_in_background(rt, c)
    else:
        await rt._teardown(c)
    return rt.open_snapshot(directory)


async def _write(rt: GVisorRuntime, c: Container, directory: Path, memory: bool) -> None:
    # Built next to the target and renamed at the end: a failed checkpoint never looks complete.
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stopped = False
    log_start = c.log.stat().st_size if c.log.exists() else 0  # what runsc writes about this checkpoint follows
    try:
        # Memory image and filesystem layer must describe the same instant: the sandbox stays stopped
        # from before the image until the upper directory is copied.
        began = time.perf_counter()
        await rt.runsc.pause(c.id)
        stopped = True
        paused = time.perf_counter()
        if memory:
            await rt.runsc.checkpoint(c.id, staging / snapshots.IMAGE, c.log, leave_running=True)
        imaged = time.perf_counter()
        await _copy_tree(c.disk / "upper", staging / snapshots.LAYER)
        log.debug("checkpoint of %s: runsc pause %.1f ms, image %.1f ms, layer copy %.1f ms", c.id,
                  (paused - began) * 1000, (imaged - paused) * 1000, (time.perf_counter() - imaged) * 1000)
        snapshots.write_meta(staging, template=c.template, lowers=c.lowers, platform=rt.settings.platform,
                             memory=memory, command=c.command, cwd=c.cwd, resources=c.config.resources)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if stopped:  # the source keeps running whatever went wrong, also when it was to be stopped
            with contextlib.suppress(RunscError):
                await rt.runsc.resume(c.id)
        if not isinstance(exc, (RunscError, OSError, SandboxFailed)):
            raise
        if (deleted := _deleted_open_file(c.log, log_start)) is not None:
            raise CheckpointRefused(
                f"sandbox {c.id} cannot be checkpointed now: a process in it keeps the deleted file /{deleted} "
                "open, which gVisor cannot save (docs/branching.md, Limits); the sandbox is "
                "unchanged. Close the program that holds it, or retry once it has let go") from exc
        if "no space left on device" in str(exc).lower() or getattr(exc, "errno", None) == errno.ENOSPC:
            raise InsufficientResources(f"no space left on {directory.parent} for a checkpoint of "
                                        f"{c.id}; the sandbox is unchanged") from exc
        raise SandboxFailed(f"checkpoint of {c.id} failed: {exc}") from exc


_DELETED_OPEN_FILE = re.compile(r'gofer\.dentry\("([^"]*)"\)\.beforeSave: deleted and invalidated dentries')


def _deleted_open_file(log: Path, start: int) -> str | None:
    """The file (relative to /) that made the checkpoint fail because it was deleted while open, from what
    runsc logged past `start`."""
    try:
        with open(log, "rb") as f:
            f.seek(max(start, f.seek(0, 2) - (256 << 10)))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    found = _DELETED_OPEN_FILE.findall(tail)
    return found[-1] if found else None


def _resume_in_background(rt: GVisorRuntime, c: Container) -> None:
    """Resumes a checkpointed source while the caller goes on (a fork restores its clone meanwhile):
    `runsc resume` is ~25 ms, mostly its command-line start. Operations on the sandbox wait for it
    (_settle) and it is not frozen meanwhile; traffic that arrives first waits in its network queue."""
    c.operations += 1  # now, not when the task first runs

    async def resume() -> None:
        try:
            for attempt in (1, 2):
                try:
                    await rt.runsc.resume(c.id)
                    return
                except RunscError as exc:
                    if attempt == 2:
                        c.resume_failure = str(exc)
                        log.error("sandbox %s did not resume after its checkpoint: %s", c.id, exc)
        finally:
            c.operations -= 1
            c.resuming = None

    c.resuming = asyncio.get_running_loop().create_task(resume())


async def _copy_tree(src: Path, dst: Path) -> None:
    """cp -a keeps ownership, modes, xattrs and overlayfs whiteouts, which shutil does not."""
    proc = await asyncio.create_subprocess_exec(
        "cp", "-a", str(src), str(dst), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"copying {src} failed: {err.decode(errors='replace').strip()}")
