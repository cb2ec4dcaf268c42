"""Warm pools: per template, a few sandboxes already restored from the template snapshot with envd up
and no identity yet, so that creating a sandbox is a claim plus envd's /init."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from corral.orchestrator.envd_link import EnvdLink
from corral.runtime.base import Runtime, RuntimeError_, Sandbox, SandboxConfig, TemplateNotFound

log = logging.getLogger("corral.pool")

# After a failed refill (e.g. the host is out of memory) wait this long before trying again.
RETRY_DELAY_S = 5.0
# A claim is followed by the new sandbox's first requests; while the pool still has sandboxes to hand
# out, its refill (runsc processes, disk setup: ~130 ms of CPU) waits this long so as not to slow them.
REFILL_DELAY_S = 0.3


class WarmPool:
    def __init__(self, runtime: Runtime, envd: EnvdLink, templates: tuple[str, ...], size: int,
                 warm_user: str = "user", warm_ups: dict[str, tuple[int, str]] | None = None,
                 freeze_ready: bool = False) -> None:
        self._runtime = runtime
        self._freeze_ready = freeze_ready  # ready sandboxes wait frozen (no CPU) until claimed
        self._warm_ups = warm_ups or {}  # template -> (port, path) POSTed after a restore
        self._warm_user = warm_user
        self._envd = envd
        self._templates = templates
        self._size = max(0, size)
        self._ready: dict[str, deque[Sandbox]] = {}
        self._fillers: dict[str, asyncio.Task] = {}
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def start(self) -> None:
        for template in self._templates:
            self._refill(template)

    def ready(self, template: str) -> int:
        return len(self._ready.get(template, ()))

    def ids(self) -> set[str]:
        return {sb.id for queue in self._ready.values() for sb in queue}

    def claim(self, template: str) -> Sandbox | None:
        """A ready sandbox, or None when the pool for `template` is empty. A popped sandbox belongs to
        the caller alone: nothing else can pop it again."""
        queue = self._ready.get(template)
        sandbox = queue.popleft() if queue else None
        if sandbox is not None:
            self._runtime.thaw(sandbox.id)
            self._runtime.raise_priority(sandbox.id)
        if template in self._templates:
            if queue:
                asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._refill, template)
            else:
                self._refill(template)
        return sandbox

    def _refill(self, template: str) -> None:
        if self._closed or self._size == 0:
            return
        task = self._fillers.get(template)
        if task is None or task.done():
            self._fillers[template] = asyncio.get_running_loop().create_task(self._fill(template))

    async def _fill(self, template: str) -> None:
        queue = self._ready.setdefault(template, deque())
        while not self._closed and len(queue) < self._size:
            try:
                sandbox = await self._runtime.create(template, SandboxConfig(low_priority=True))
            except TemplateNotFound as e:
                log.warning("not pooling %s: %s", template, e)
                return
            except RuntimeError_ as e:
                log.warning("pool refill for %s failed: %s", template, e)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            try:
                await self._envd.wait_ready(sandbox.address)
                await self._envd.warm(sandbox.address, self._warm_user)
                if template in self._warm_ups:
                    await self._envd.warm_service(sandbox.address, *self._warm_ups[template])
            except Exception as e:
                log.warning("pooled sandbox %s is not ready to hand out: %s", sandbox.id, e)
                await self._runtime.destroy(sandbox.id)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if self._closed:
                await self._runtime.destroy(sandbox.id)
                return
            if self._freeze_ready:
                self._runtime.freeze(sandbox.id)
            queue.append(sandbox)

    async def close(self) -> None:
        self._closed = True
        for task in self._fillers.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for queue in self._ready.values():
            while queue:
                with contextlib.suppress(RuntimeError_):
                    await self._runtime.destroy(queue.popleft().id)
