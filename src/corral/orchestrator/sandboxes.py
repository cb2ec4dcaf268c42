"""Live sandboxes on this node: created from a pool or restored directly, handed their identity through
envd's /init, killed, and found again after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

from corral.orchestrator.envd_link import EnvdLink
from corral.orchestrator.pool import WarmPool
from corral.runtime.base import Runtime, RuntimeError_, Sandbox, SandboxConfig, SandboxNotFound

log = logging.getLogger("corral.orchestrator")

# What E2B templates set up: commands run as `user` in its home unless a request says otherwise.
DEFAULT_USER = "user"
DEFAULT_WORKDIR = "/home/user"


class Orchestrator:
    def __init__(self, runtime: Runtime, *, pool_size: int = 0, pool_templates: tuple[str, ...] = (),
                 direct_concurrency: int | None = None) -> None:
        self.runtime = runtime
        # Restores beyond the pool run a few at a time, first come first served: on a small host a
        # burst of unbounded restores thrashes until every one of them is late.
        self._direct = asyncio.Semaphore(direct_concurrency or max(2, os.cpu_count() or 2))
        self.envd = EnvdLink()
        self.pool = WarmPool(runtime, self.envd, pool_templates, pool_size)
        self._live: dict[str, Sandbox] = {}
        # Called with a sandbox id when it is killed (the proxy drops its connections).
        self.on_gone: list[Callable[[str], Awaitable[None]]] = []

    async def start(self, keep: set[str]) -> set[str]:
        """Adopts the runtime's running sandboxes that are in `keep` and destroys the others (pooled or
        half-created ones from before a restart). Returns the ids that are live again."""
        await self.runtime.start()
        for sandbox in self.runtime.list():
            if sandbox.id in keep:
                self._live[sandbox.id] = sandbox
            else:
                with contextlib.suppress(RuntimeError_):
                    await self.runtime.destroy(sandbox.id)
        self.pool.start()
        return set(self._live)

    async def close(self) -> None:
        """Stops pooling; live sandboxes keep running so a restarted server finds them again."""
        await self.pool.close()
        await self.envd.close()
        await self.runtime.close()

    def address(self, sandbox_id: str) -> str | None:
        sandbox = self._live.get(sandbox_id)
        return sandbox.address if sandbox else None

    def live_ids(self) -> set[str]:
        return set(self._live)

    async def create(self, template: str, *, token: str, env_vars: dict[str, str], internet: bool) -> Sandbox:
        sandbox = self.pool.claim(template)
        try:
            if sandbox is None:
                async with self._direct:
                    sandbox = self.pool.claim(template)  # one may have become ready while we waited
                    if sandbox is None:
                        sandbox = await self.runtime.create(template, SandboxConfig(internet=internet))
                        await self.envd.wait_ready(sandbox.address)
                    elif not internet:
                        await self.runtime.set_internet(sandbox.id, False)
            elif not internet:
                await self.runtime.set_internet(sandbox.id, False)
            await self.envd.init(sandbox.address, token=token, env_vars=env_vars, user=DEFAULT_USER,
                                 workdir=DEFAULT_WORKDIR, hostname=sandbox.id)
        except BaseException:
            if sandbox is not None:
                with contextlib.suppress(RuntimeError_):
                    await self.runtime.destroy(sandbox.id)
            raise
        self._live[sandbox.id] = sandbox
        return sandbox

    async def kill(self, sandbox_id: str) -> bool:
        sandbox = self._live.pop(sandbox_id, None)  # unreachable through the proxy from here on
        if sandbox is None:
            return False
        for callback in self.on_gone:
            with contextlib.suppress(Exception):
                await callback(sandbox_id)
        with contextlib.suppress(SandboxNotFound):
            await self.runtime.destroy(sandbox_id)
        return True

    async def metrics(self, sandbox_id: str, token: str) -> dict | None:
        address = self.address(sandbox_id)
        if address is None:
            return None
        return await self.envd.metrics(address, token)
