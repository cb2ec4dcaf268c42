"""Live sandboxes on this node: created from stock or started directly, handed their identity through
envd's /init, checkpointed, killed, and found again after a restart. Policy lives here and in capacity.py;
the runtime only does what it is told."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.orchestrator.capacity import Capacity, WarmUp
from corral.orchestrator.envd_link import EnvdLink, EnvdUnavailable
from corral.orchestrator.idle import IdleFreezer
from corral.orchestrator.registry import LiveSandbox, Registry
from corral.runtime.base import (
    ExecResult,
    Resources,
    Runtime,
    RuntimeError_,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxNotFound,
    Snapshot,
    VolumeMount,
)

log = logging.getLogger("corral.orchestrator")

# A sandbox must hold no TCP connection to the host when it is checkpointed: gVisor (20240729) restores
# such a connection into a clone whose address has changed and the clone's network then stops answering
# (docs/branching.md). The proxy's connections are closed first; the checkpoint waits until the host's
# socket table shows the sandbox has closed its side of each (usually a few ms), for at most this long.
QUIESCE_S = 0.1
QUIESCE_POLL_S = 0.002

class Orchestrator:
    def __init__(self, runtime: Runtime, resolve_template: Callable[[str], Path], *, pool_size: int = 0,
                 pool_templates: tuple[str, ...] = (), prepared_size: int = 0,
                 warm_ups: dict[str, WarmUp] | None = None, idle_after_s: float = 0.0,
                 idle_fresh_s: float = 1.0, breathe_every_s: float = 10.0, resume_warm_s: float = 0.0,
                 resume_warm_max: int = 16, budget: int | None = None, envd: EnvdLink | None = None,
                 template_resources: dict[str, Resources] | None = None) -> None:
        self.runtime = runtime
        # Templates whose sandboxes get other resources than the default (the `desktop` recipe's memory).
        self._template_resources = template_resources or {}
        self._resolve_template = resolve_template
        self.envd = envd or EnvdLink()  # tests pass a stand-in (corral.runtime.fake.FakeEnvd)
        self.registry = Registry()
        self._templates: dict[str, Snapshot] = {}  # the snapshot each template started from last
        self.capacity = Capacity(runtime, self.envd, self.template_snapshot, ready_templates=pool_templates,
                                 ready_size=pool_size, prepared_size=prepared_size, warm_ups=warm_ups,
                                 freeze_ready=idle_after_s > 0, resume_keep_s=resume_warm_s,
                                 resume_most=resume_warm_max, budget=budget,
                                 template_resources=template_resources)
        self.idle = IdleFreezer(runtime, self.runtime_id, idle_after_s=idle_after_s, fresh_after_s=idle_fresh_s,
                                breathe_every_s=breathe_every_s)
        # Called with a sandbox id when it is killed, paused or checkpointed (the proxy drops its connections).
        self.on_gone: list[Callable[[str], Awaitable[None]]] = []
        # PEM certificates every new sandbox trusts (the CA of the public URLs), handed over with /init; and
        # those a sandbox with header rules trusts besides (the egress proxy's CA), handed over when it gets
        # rules. Only what a sandbox needs: each costs envd a rewrite of the sandbox's CA bundle.
        self.trusted_certificates: str | None = None
        self.intercept_certificates: str | None = None

    def resources_for(self, template: str) -> Resources:
        """What a new sandbox of `template` gets."""
        return self._template_resources.get(template, Resources())

    def template_snapshot(self, template: str) -> Snapshot:
        """The snapshot sandboxes of `template` start from (TemplateNotFound when it is not built). When a
        template is rebuilt, what was kept ready for its old snapshot is released."""
        path = self._resolve_template(template)
        known = self._templates.get(template)
        if known is not None and known.path == path:
            return known
        snapshot = self._templates[template] = self.runtime.open_snapshot(path)
        if known is not None:
            self.capacity.spawn(self.capacity.release(known.path))
        return snapshot

    async def start(self, keep: dict[str, tuple[str, str]]) -> set[str]:
        """Adopts the runtime's running sandboxes named in `keep` (API id -> (runtime id, envd token)) and
        destroys the others (half-created ones from before a restart). Returns the API ids live again."""
        await self.runtime.open()
        by_runtime_id = {runtime_id: (api_id, token) for api_id, (runtime_id, token) in keep.items()}
        for sandbox in self.runtime.list():
            if sandbox.id in by_runtime_id:
                api_id, token = by_runtime_id[sandbox.id]
                self._go_live(api_id, sandbox, token)
            else:
                with contextlib.suppress(RuntimeError_):
                    await self.runtime.destroy(sandbox.id)
        self.capacity.open()
        self.idle.start()
        return self.registry.ids()

    async def close(self) -> None:
        """Stops pooling; live sandboxes keep running so a restarted server finds them again."""
        await self.idle.close()
        await self.capacity.close()
        await self.envd.close()
        await self.runtime.close()

    # --- the registry --------------------------------------------------------------------------------

    def address(self, sandbox_id: str) -> str | None:
        entry = self.registry.get(sandbox_id)
        return entry.sandbox.address if entry else None

    async def reachable_address(self, sandbox_id: str) -> str | None:
        """The address, once no checkpoint of the sandbox is in progress (the proxy waits here)."""
        while (entry := self.registry.get(sandbox_id)) is not None and not entry.reachable.is_set():
            await entry.reachable.wait()
        return entry.sandbox.address if entry else None

    def in_use(self, sandbox_id: str):
        """Context manager around a proxied request: the sandbox is not idle while it is open."""
        return self.idle.in_use(sandbox_id)

    def noticed(self, sandbox_id: str) -> None:
        """Its owner asked the API about it: see IdleFreezer.noticed."""
        self.idle.noticed(sandbox_id)

    def keep_awake(self, sandbox_id: str, awake: bool = True) -> None:
        """While the host waits on work it started in the sandbox (a recording), the idle policy leaves it
        running; `awake=False` lets go. Holds across pauses and resumes (by API id)."""
        self.idle.keep_awake(sandbox_id, awake)

    async def run(self, sandbox_id: str, argv: list[str], *, timeout: float = 30.0) -> ExecResult:
        """Runs a command as root in the running sandbox through its envd, so what it starts in the
        background lives on over a pause and resume like the user's own processes (SandboxNotFound when the
        sandbox does not run here, SandboxFailed when envd fails it)."""
        address, token = await self._envd_of(sandbox_id)
        with self.in_use(sandbox_id):
            try:
                return await self.envd.run(address, token, argv, user="root", timeout=timeout)
            except EnvdUnavailable as e:
                raise SandboxFailed(str(e)) from e

    async def _envd_of(self, sandbox_id: str) -> tuple[str, str]:
        """The running sandbox's address and envd token (SandboxNotFound when it does not run here)."""
        address, token = await self.reachable_address(sandbox_id), self.token_of(sandbox_id)
        if address is None or token is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} is not running on this node")
        return address, token

    async def download(self, sandbox_id: str, path: str, destination: Path, *, max_bytes: int) -> int:
        """Copies a file out of the running sandbox through its envd; its size."""
        address, token = await self._envd_of(sandbox_id)
        with self.in_use(sandbox_id):
            try:
                return await self.envd.download(address, token, path, destination, max_bytes)
            except EnvdUnavailable as e:
                raise SandboxFailed(str(e)) from e

    def _go_live(self, sandbox_id: str, sandbox: Sandbox, token: str, *, fresh: bool = False) -> LiveSandbox:
        entry = self.registry.add(sandbox_id, sandbox, token)
        self.idle.track(sandbox_id, fresh=fresh)
        return entry

    def live_ids(self) -> set[str]:
        return self.registry.ids()

    def runtime_id(self, sandbox_id: str) -> str | None:
        entry = self.registry.get(sandbox_id)
        return entry.sandbox.id if entry else None

    def token_of(self, sandbox_id: str) -> str | None:
        entry = self.registry.get(sandbox_id)
        return entry.token if entry else None

    # --- create and kill -------------------------------------------------------------------------------

    async def create(self, template: str, *, token: str, env_vars: dict[str, str], internet: bool,
                     allow_out: tuple[str, ...] = (), deny_out: tuple[str, ...] = (),
                     allow_domains: tuple[str, ...] = (), header_rules: dict | None = None,
                     volumes: tuple[VolumeMount, ...] = ()) -> Sandbox:
        ready = self.capacity.claim_ready(template)
        if ready is not None:
            try:
                return await self._hand_over(ready, token, env_vars, started=False, internet=internet,
                                             allow_out=allow_out, deny_out=deny_out, allow_domains=allow_domains,
                                             header_rules=header_rules, volumes=volumes)
            except EnvdUnavailable as exc:
                # It can have died while it waited in stock (still live to the runtime, its envd gone): the
                # create then takes the ordinary way.
                log.warning("ready sandbox %s of %s does not answer (%s); starting a new one", ready.id,
                            template, exc)
        snapshot = self.template_snapshot(template)
        config = SandboxConfig(resources=self.resources_for(template), internet=internet,
                               egress_allow=allow_out, egress_deny=deny_out, egress_domains=allow_domains,
                               egress_rules=header_rules or {}, volumes=volumes)
        sandbox = await self.capacity.start(snapshot, config, stock=True)
        return await self._hand_over(sandbox, token, env_vars, started=True, booted=not snapshot.has_memory,
                                     internet=internet, header_rules=header_rules, volumes=volumes)

    async def _hand_over(self, sandbox: Sandbox, token: str, env_vars: dict[str, str], *, started: bool,
                         internet: bool, booted: bool = False, allow_out: tuple[str, ...] = (),
                         deny_out: tuple[str, ...] = (), allow_domains: tuple[str, ...] = (),
                         header_rules: dict | None = None, volumes: tuple[VolumeMount, ...] = ()) -> Sandbox:
        """Hands `sandbox` its identity through envd's /init and makes it live; it is destroyed if that fails.
        `started`: just started for this create, not claimed ready; `booted`: cold-booted, so envd may not be
        up yet. Restored from memory, envd is the process that answered before the checkpoint: /init goes
        straight to it (and retries while its restored socket is not reachable yet)."""
        try:
            if booted:
                await self.envd.wait_ready(sandbox.address)
            elif not started:  # a ready sandbox was started for anyone: it gets this create's egress now
                if not internet:
                    await self.runtime.set_internet(sandbox.id, False)
                if allow_out or deny_out or allow_domains or header_rules:
                    await self.runtime.set_egress_rules(sandbox.id, allow_out, deny_out, allow_domains,
                                                        header_rules or {})
                if volumes:
                    await self.runtime.attach_volumes(sandbox.id, volumes)
            await self.envd.init(sandbox.address, token=token, env_vars=env_vars, hostname=sandbox.id,
                                 trusted_certificates=self._certificates_for(header_rules), volumes=volumes)
        except BaseException:
            with contextlib.suppress(RuntimeError_):
                await self.runtime.destroy(sandbox.id)
            raise
        self._go_live(sandbox.id, sandbox, token, fresh=True)
        return sandbox

    async def set_egress(self, sandbox_id: str, *, internet: bool, allow_out: tuple[str, ...],
                         deny_out: tuple[str, ...], allow_domains: tuple[str, ...] = (),
                         header_rules: dict | None = None) -> None:
        """What the running sandbox may reach, from its next connection on."""
        entry = self._running(sandbox_id)
        if header_rules and not entry.sandbox.config.egress_rules and self.intercept_certificates:
            # Its first header rules: it must trust the certificates the egress proxy will show it.
            await self.envd.trust(entry.sandbox.address, entry.token, self.intercept_certificates)
        await self.runtime.set_egress_rules(entry.sandbox.id, allow_out, deny_out, allow_domains, header_rules or {})
        await self.runtime.set_internet(entry.sandbox.id, internet)

    def _certificates_for(self, header_rules: dict | None) -> str | None:
        wanted = [self.trusted_certificates, self.intercept_certificates if header_rules else None]
        return "\n".join(p for p in wanted if p) or None

    async def kill(self, sandbox_id: str) -> bool:
        entry = await self._take_offline(sandbox_id)
        if entry is None:
            return False
        with contextlib.suppress(SandboxNotFound):
            await self.runtime.destroy(entry.sandbox.id)
        return True

    async def _take_offline(self, sandbox_id: str) -> LiveSandbox | None:
        entry = self.registry.remove(sandbox_id)  # unreachable through the proxy from here on
        self.idle.forget(sandbox_id)
        if entry is not None:
            await self._drop_connections(sandbox_id)
        return entry

    async def _drop_connections(self, sandbox_id: str) -> None:
        for callback in self.on_gone:
            with contextlib.suppress(Exception):
                await callback(sandbox_id)

    # --- checkpoints -----------------------------------------------------------------------------------

    def _running(self, sandbox_id: str) -> LiveSandbox:
        entry = self.registry.get(sandbox_id)
        if entry is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} is not running on this node")
        return entry

    @contextlib.asynccontextmanager
    async def _quiesced(self, entry: LiveSandbox):
        """No connection from the host into the sandbox while it is checkpointed; new ones wait."""
        entry.reachable.clear()
        try:
            await self._drop_connections(entry.api_id)
            await self._connections_closed(entry)
            yield
        finally:
            entry.reachable.set()

    async def _connections_closed(self, entry: LiveSandbox) -> None:
        runtime_id = entry.sandbox.id
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
        log.info("checkpoint of %s: %d connection(s) still open after %.0f ms", entry.api_id,
                 self.runtime.host_connections(runtime_id) or 0, QUIESCE_S * 1000)

    async def checkpoint(self, sandbox_id: str, directory: Path, *, memory: bool = True,
                         clones: int = 0) -> Snapshot:
        """Checkpoints a running sandbox, which goes on running (it is stopped for the moment it takes).
        Connections through the proxy into it are closed first. `clones` sandboxes about to be started
        from the checkpoint (a fork) have their containers prepared meanwhile."""
        entry = self._running(sandbox_id)
        self.idle.wake(sandbox_id)
        preparing = None
        if clones:
            preparing = asyncio.ensure_future(
                self.capacity.prepare_alongside(entry.sandbox.template, entry.sandbox, clones))
        try:
            with self.capacity.user_work():
                async with self._quiesced(entry):
                    return await self.runtime.checkpoint(entry.sandbox.id, directory, memory=memory)
        finally:
            if preparing is not None:
                with contextlib.suppress(Exception):
                    await preparing

    async def pause(self, sandbox_id: str, directory: Path, *, memory: bool = True) -> Snapshot:
        """Checkpoints a sandbox and stops it: it uses no CPU and no memory until started again from the
        snapshot. On failure it keeps running and stays reachable."""
        entry = self._running(sandbox_id)
        self.idle.wake(sandbox_id)  # a frozen sandbox could not close its connections
        with self.capacity.user_work():
            async with self._quiesced(entry):
                await self._take_offline(sandbox_id)
                try:
                    snapshot = await self.runtime.checkpoint(entry.sandbox.id, directory, memory=memory,
                                                             leave_running=False)
                except BaseException:
                    if entry.sandbox.id in {s.id for s in self.runtime.list()}:
                        self._go_live(sandbox_id, entry.sandbox, entry.token)
                    raise
        self.capacity.hold_for_resume(snapshot, entry.sandbox.config.resources)
        return snapshot

    def resume_ready(self) -> int:
        """Paused sandboxes whose resume is prepared right now."""
        return self.capacity.resume_ready()

    async def release_prepared(self, directory: Path) -> None:
        """Frees what is held ready to start from the snapshot in `directory` (its paused sandbox was
        killed, its node deleted: the files may be gone already)."""
        await self.capacity.release(directory)

    async def start_from(self, snapshot: Snapshot, *, sandbox_id: str | None, token: str, current_token: str,
                         env_vars: dict[str, str], internet: bool, resources: Resources,
                         memory: bool = True, allow_out: tuple[str, ...] = (),
                         deny_out: tuple[str, ...] = (), allow_domains: tuple[str, ...] = (),
                         header_rules: dict | None = None,
                         volumes: tuple[VolumeMount, ...] = ()) -> tuple[str, Sandbox]:
        """A running sandbox from a snapshot: the paused sandbox `sandbox_id` itself (resume), or a new one
        (sandbox_id None: fork or start from a snapshot) with its own id and envd token. Returns the API id
        and the runtime's sandbox."""
        config = SandboxConfig(resources=resources, internet=internet, hostname=sandbox_id,
                               egress_allow=allow_out, egress_deny=deny_out, egress_domains=allow_domains,
                               egress_rules=header_rules or {}, volumes=volumes)
        started = time.perf_counter()
        await self.capacity.settled(snapshot)
        settled = time.perf_counter()
        sandbox = await self.capacity.start(snapshot, config, memory=memory)
        restored = time.perf_counter()
        self.capacity.used(snapshot)
        api_id = sandbox_id or sandbox.id
        try:
            cold = not (memory and snapshot.has_memory)
            if cold:
                await self.envd.wait_ready(sandbox.address)
            elif sandbox_id is not None:
                await self.envd.wait_listening(sandbox.address)  # a resume: the same envd as before the pause
            if cold or sandbox_id is None:
                # A cold-booted envd starts without identity; a clone carries its source's and gets its own.
                await self.envd.init(sandbox.address, token=token, env_vars=env_vars, hostname=api_id,
                                     current_token=None if cold else current_token,
                                     trusted_certificates=self._certificates_for(header_rules), volumes=volumes)
            log.debug("start of %s from %s: waited %.1f ms for its preparation, restore %.1f ms, envd ready "
                      "%.1f ms later", api_id, snapshot.path.name, (settled - started) * 1000,
                      (restored - settled) * 1000, (time.perf_counter() - restored) * 1000)
        except BaseException:
            with contextlib.suppress(RuntimeError_):
                await self.runtime.destroy(sandbox.id)
            raise
        self._go_live(api_id, sandbox, token)
        return api_id, sandbox

    async def metrics(self, sandbox_id: str) -> dict | None:
        entry = self.registry.get(sandbox_id)
        if entry is None or not entry.reachable.is_set() or self.idle.frozen(sandbox_id):
            return None  # a frozen sandbox is not woken to be sampled: its history has a gap
        return await self.envd.metrics(entry.sandbox.address, entry.token)
