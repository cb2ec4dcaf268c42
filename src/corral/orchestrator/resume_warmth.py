"""Paused sandboxes resume faster for a while: their container is prepared right after the pause.

A resume is a restore, and ~130 ms of a restore is setup that does not depend on the memory image
(network namespace, disk, overlay, `runsc create`; docs/gvisor-notes §3). For `keep_s` after a pause
that setup is held ready, frozen: no CPU, ~10 MiB (a gVisor sandbox process and gofer that have not
booted). Then it is released and the paused sandbox holds no process at all. At most `most` are held;
a new pause releases the oldest beyond that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from corral.runtime.base import Resources, Runtime

log = logging.getLogger("corral.orchestrator")


@dataclass
class _Hold:
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set to end the hold early
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the preparation finished (or failed)
    task: asyncio.Task | None = None


class ResumeWarmth:
    def __init__(self, runtime: Runtime, *, keep_s: float, most: int) -> None:
        self._runtime = runtime
        self._keep_s = keep_s
        self._most = most
        self._held: OrderedDict[Path, _Hold] = OrderedDict()  # by checkpoint directory, oldest first
        self._tasks: set[asyncio.Task] = set()  # evicted holds too, until they have released

    def hold(self, directory: Path, resources: Resources) -> None:
        """Starts preparing a resume from `directory` in the background."""
        if self._keep_s <= 0 or self._most <= 0 or directory in self._held:
            return
        while len(self._held) >= self._most:
            _, oldest = self._held.popitem(last=False)
            oldest.done.set()  # its task releases it
        hold = self._held[directory] = _Hold()
        task = hold.task = asyncio.get_running_loop().create_task(self._hold(directory, resources, hold))
        self._tasks.add(task)
        task.add_done_callback(lambda _: self._forget(directory, task))

    def ready(self) -> int:
        return sum(1 for directory in self._held if self._runtime.prepared(directory))

    async def settled(self, directory: Path, timeout: float = 5.0) -> None:
        """Waits while the resume from `directory` is being prepared: a resume right after its pause then
        takes the container being made instead of making a second one next to it."""
        hold = self._held.get(directory)
        if hold is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.settled.wait(), timeout)

    def used(self, directory: Path) -> None:
        """A restore from `directory` took (or did without) what was prepared: stop holding it."""
        if (hold := self._held.get(directory)) is not None:
            hold.done.set()

    async def release(self, directory: Path) -> None:
        """Ends the hold on `directory` and waits until what it held is freed."""
        hold = self._held.get(directory)
        if hold is not None:
            hold.done.set()
            with contextlib.suppress(Exception):
                await hold.task
        await self._runtime.release_prepared(directory)

    async def close(self) -> None:
        for hold in self._held.values():
            hold.done.set()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task

    async def _hold(self, directory: Path, resources: Resources, hold: _Hold) -> None:
        # Never cancelled: a container interrupted half-way through its setup would be left behind.
        try:
            prepared = await self._runtime.prepare_restore(directory, resources)
            hold.settled.set()
            if prepared:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hold.done.wait(), self._keep_s)
        except Exception as exc:  # an optimisation only: the resume then does the whole restore
            log.info("could not prepare the resume from %s: %s", directory.name, exc)
        finally:
            hold.settled.set()
            with contextlib.suppress(Exception):
                await self._runtime.release_prepared(directory)

    def _forget(self, directory: Path, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        hold = self._held.get(directory)
        if hold is not None and hold.task is task:
            del self._held[directory]
