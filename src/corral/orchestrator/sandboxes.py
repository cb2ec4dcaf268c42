"""Live sandboxes on this node: created from a pool or restored directly, handed their identity through
envd's /init, killed, and found again after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.orchestrator.envd_link import EnvdLink
from corral.orchestrator.idle import IdleFreezer
from corral.orchestrator.pool import WarmPool
from corral.orchestrator.resume_warmth import ResumeWarmth
from corral.runtime.base import (
    Checkpoint,
    Resources,
    Runtime,
    RuntimeError_,
    Sandbox,
    SandboxConfig,
    SandboxNotFound,
)

log = logging.getLogger("corral.orchestrator")

# A sandbox must hold no TCP connection to the host when it is checkpointed: gVisor (20240729) restores
# such a connection into a clone whose address has changed and the clone's network then stops answering
# (docs/branching.md). The proxy's connections are closed first; the checkpoint waits until the host's
# socket table shows the sandbox has closed its side of each (usually a few ms), for at most this long.
QUIESCE_S = 0.1
QUIESCE_POLL_S = 0.002

# What E2B templates set up: commands run as `user` in its home unless a request says otherwise.
DEFAULT_USER = "user"
DEFAULT_WORKDIR = "/home/user"


class Orchestrator:
    def __init__(self, runtime: Runtime, *, pool_size: int = 0, pool_templates: tuple[str, ...] = (),
                 direct_concurrency: int | None = None, warm_ups: dict[str, tuple[int, str]] | None = None,
                 idle_after_s: float = 0.0, idle_fresh_s: float = 1.0, breathe_every_s: float = 10.0,
                 resume_warm_s: float = 0.0, resume_warm_max: int = 16) -> None:
        self.runtime = runtime
        self._resume_warm = ResumeWarmth(runtime, keep_s=resume_warm_s, most=resume_warm_max)
        # Restores beyond the pool run a few at a time, first come first served: on a small host a
        # burst of unbounded restores thrashes until every one of them is late.
        self._direct = asyncio.Semaphore(direct_concurrency or max(2, os.cpu_count() or 2))
        # Restores from checkpoints (resume, fork, snapshots), bounded the same way: on 2 cores, 4 at a time
        # measured no faster than 2 (fork x10: 2.2 s vs 2.0 s).
        self._restores = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        self.envd = EnvdLink()
        self.pool = WarmPool(runtime, self.envd, pool_templates, pool_size, warm_ups=warm_ups,
                             freeze_ready=idle_after_s > 0)
        self.idle = IdleFreezer(runtime, self.runtime_id, idle_after_s=idle_after_s, fresh_after_s=idle_fresh_s,
                                breathe_every_s=breathe_every_s)
        self._live: dict[str, Sandbox] = {}
        # Called with a sandbox id when it is killed, paused or checkpointed (the proxy drops its connections).
        self.on_gone: list[Callable[[str], Awaitable[None]]] = []
        self._quiet: dict[str, asyncio.Event] = {}  # sandboxes being checkpointed: no new connections

    async def start(self, keep: dict[str, str]) -> set[str]:
        """Adopts the runtime's running sandboxes named in `keep` (API id -> runtime id) and destroys the
        others (pooled or half-created ones from before a restart). Returns the API ids live again."""
        await self.runtime.start()
        api_ids = {runtime_id: api_id for api_id, runtime_id in keep.items()}
        for sandbox in self.runtime.list():
            if sandbox.id in api_ids:
                self._go_live(api_ids[sandbox.id], sandbox)
            else:
                with contextlib.suppress(RuntimeError_):
                    await self.runtime.destroy(sandbox.id)
        self.pool.start()
        self.idle.start()
        return set(self._live)

    async def close(self) -> None:
        """Stops pooling; live sandboxes keep running so a restarted server finds them again."""
        await self._resume_warm.close()
        await self.idle.close()
        await self.pool.close()
        await self.envd.close()
        await self.runtime.close()

    def address(self, sandbox_id: str) -> str | None:
        sandbox = self._live.get(sandbox_id)
        return sandbox.address if sandbox else None

    async def reachable_address(self, sandbox_id: str) -> str | None:
        """The address, once no checkpoint of the sandbox is in progress (the proxy waits here)."""
        while (quiet := self._quiet.get(sandbox_id)) is not None:
            await quiet.wait()
        return self.address(sandbox_id)

    def in_use(self, sandbox_id: str):
        """Context manager around a proxied request: the sandbox is not idle while it is open."""
        return self.idle.in_use(sandbox_id)

    def noticed(self, sandbox_id: str) -> None:
        """Its owner asked the API about it: see IdleFreezer.noticed."""
        self.idle.noticed(sandbox_id)

    def _go_live(self, sandbox_id: str, sandbox: Sandbox, *, fresh: bool = False) -> None:
        self._live[sandbox_id] = sandbox
        self.idle.track(sandbox_id, fresh=fresh)

    def live_ids(self) -> set[str]:
        return set(self._live)

    def runtime_id(self, sandbox_id: str) -> str | None:
        sandbox = self._live.get(sandbox_id)
        return sandbox.id if sandbox else None

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
        self._go_live(sandbox.id, sandbox, fresh=True)
        return sandbox

    async def kill(self, sandbox_id: str) -> bool:
        sandbox = await self._take_offline(sandbox_id)
        if sandbox is None:
            return False
        with contextlib.suppress(SandboxNotFound):
            await self.runtime.destroy(sandbox.id)
        return True

    async def _take_offline(self, sandbox_id: str) -> Sandbox | None:
        sandbox = self._live.pop(sandbox_id, None)  # unreachable through the proxy from here on
        self.idle.forget(sandbox_id)
        if sandbox is not None:
            for callback in self.on_gone:
                with contextlib.suppress(Exception):
                    await callback(sandbox_id)
        return sandbox

    # --- checkpoints -----------------------------------------------------------------------------

    def _running(self, sandbox_id: str) -> Sandbox:
        sandbox = self._live.get(sandbox_id)
        if sandbox is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} is not running on this node")
        return sandbox

    @contextlib.asynccontextmanager
    async def _quiesced(self, sandbox_id: str):
        """No connection from the host into the sandbox while it is checkpointed; new ones wait."""
        quiet = self._quiet[sandbox_id] = asyncio.Event()
        try:
            for callback in self.on_gone:
                with contextlib.suppress(Exception):
                    await callback(sandbox_id)
            await self._connections_closed(sandbox_id)
            yield
        finally:
            del self._quiet[sandbox_id]
            quiet.set()

    async def _connections_closed(self, sandbox_id: str) -> None:
        runtime_id = self._running(sandbox_id).id
        deadline = time.monotonic() + QUIESCE_S
        while time.monotonic() < deadline:
            try:
                open_ = self.runtime.host_connections(runtime_id)
            except (RuntimeError_, OSError):
                open_ = None
            if open_ is None:  # the backend cannot tell: give the sandbox the whole time
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return
            if open_ == 0:
                return
            await asyncio.sleep(QUIESCE_POLL_S)
        log.info("checkpoint of %s: %d connection(s) still open after %.0f ms", sandbox_id,
                 self.runtime.host_connections(runtime_id) or 0, QUIESCE_S * 1000)

    async def checkpoint(self, sandbox_id: str, directory: Path, *, memory: bool = True,
                         clones: int = 0) -> Checkpoint:
        """Checkpoints a running sandbox, which goes on running (it is frozen for the moment it takes).
        Connections through the proxy into it are closed first. `clones` sandboxes about to be started
        from the checkpoint (a fork) have their containers prepared meanwhile."""
        runtime_id = self._running(sandbox_id).id
        self.idle.wake(sandbox_id)
        preparing = asyncio.ensure_future(self.runtime.prepare_like(runtime_id, clones)) if clones else None
        try:
            async with self._quiesced(sandbox_id):
                return await self.runtime.checkpoint(runtime_id, directory, memory=memory)
        finally:
            if preparing is not None:
                with contextlib.suppress(Exception):
                    await preparing

    async def pause(self, sandbox_id: str, directory: Path, *, memory: bool = True) -> Checkpoint:
        """Checkpoints a sandbox and stops it: it uses no CPU and no memory until `resume`. On failure it
        keeps running and stays reachable."""
        sandbox = self._running(sandbox_id)
        self.idle.wake(sandbox_id)  # a frozen sandbox could not close its connections
        async with self._quiesced(sandbox_id):
            await self._take_offline(sandbox_id)
            try:
                checkpoint = await self.runtime.checkpoint(sandbox.id, directory, memory=memory,
                                                           leave_running=False)
            except BaseException:
                if sandbox.id in {s.id for s in self.runtime.list()}:
                    self._go_live(sandbox_id, sandbox)
                raise
        if memory:
            self._resume_warm.hold(directory, sandbox.config.resources)
        return checkpoint

    def resume_ready(self) -> int:
        """Paused sandboxes whose resume is prepared right now."""
        return self._resume_warm.ready()

    async def release_prepared(self, directory: Path) -> None:
        """Frees what is held ready to resume from `directory` (its paused sandbox was killed)."""
        await self._resume_warm.release(directory)

    async def start_from(self, directory: Path, *, sandbox_id: str | None, token: str, current_token: str,
                         env_vars: dict[str, str], internet: bool, resources: Resources,
                         memory: bool = True) -> tuple[str, Sandbox]:
        """A running sandbox from a checkpoint: the paused sandbox `sandbox_id` itself (resume), or a new
        one (sandbox_id None: fork or start from a snapshot) with its own id and envd token. Returns the
        API id and the runtime's sandbox."""
        config = SandboxConfig(resources=resources, internet=internet, hostname=sandbox_id)
        started = time.perf_counter()
        await self._resume_warm.settled(directory)
        settled = time.perf_counter()
        async with self._restores:
            (sandbox,) = await self.runtime.restore(directory, 1, config, memory=memory)
        restored = time.perf_counter()
        self._resume_warm.used(directory)
        api_id = sandbox_id or sandbox.id
        try:
            cold = not (memory and (directory / "image").is_dir())
            if cold:
                await self.envd.wait_ready(sandbox.address)
            elif sandbox_id is not None:
                await self.envd.wait_listening(sandbox.address)  # a resume: the same envd as before the pause
            if cold or sandbox_id is None:
                # A cold-booted envd starts without identity; a clone carries its source's and gets its own.
                await self.envd.init(sandbox.address, token=token, env_vars=env_vars, user=DEFAULT_USER,
                                     workdir=DEFAULT_WORKDIR, hostname=api_id,
                                     current_token=None if cold else current_token)
            log.debug("start of %s from %s: waited %.1f ms for its preparation, restore %.1f ms, envd ready "
                      "%.1f ms later", api_id, directory.name, (settled - started) * 1000,
                      (restored - settled) * 1000, (time.perf_counter() - restored) * 1000)
        except BaseException:
            with contextlib.suppress(RuntimeError_):
                await self.runtime.destroy(sandbox.id)
            raise
        self._go_live(api_id, sandbox)
        return api_id, sandbox

    async def metrics(self, sandbox_id: str, token: str) -> dict | None:
        address = self.address(sandbox_id)
        if address is None or sandbox_id in self._quiet or self.idle.frozen(sandbox_id):
            return None  # a frozen sandbox is not woken to be sampled: its history has a gap
        return await self.envd.metrics(address, token)
