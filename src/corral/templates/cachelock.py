"""An exclusive lock on one entry of the template cache, shared by every Corral process on the host (a
`corral serve`, a `corral template build`, a second instance): the first to come makes the entry, the others
wait and then find it made, instead of two writers clobbering one `.partial` directory."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path


@contextlib.asynccontextmanager
async def cache_lock(path: Path, on_wait: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """An exclusive flock on `path` (made if missing), waited for without blocking the event loop; `on_wait`
    is called once if another process holds it. The kernel drops the lock with its holder, even a killed one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if on_wait is not None and not told:
                    on_wait()
                    told = True
                await asyncio.sleep(0.2)
        yield
    finally:
        os.close(fd)
