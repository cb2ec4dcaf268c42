"""The gVisor backend: every sandbox is a runsc container (systrap platform) with its own network
namespace, its own disk and a host overlayfs root over read-only layers.

Per container, on the host:
  <data>/sandboxes/<id>/disk.img     sparse ext4 image = the disk quota, mounted at disk/
  <data>/sandboxes/<id>/rootfs       overlayfs: lower = snapshot layers + template rootfs, upper = disk/upper
  <data>/sandboxes/<id>/bundle       OCI bundle; runsc.log collects what runsc and the sandbox print
  <data>/sandboxes/<id>/record.json  written once the sandbox is live; the only thing start() adopts from
  netns corral-<instance>-<slot>     veth to the host, /30 addresses (corral.network.slots)
  runsc container <id> under <run>/runsc

Containers live in one table with explicit states (containers.py); snapshots are in snapshots.py; the
instance lock, reaping and crash recovery in host.py and recovery.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from corral.config import Settings
from corral.network import firewall, service
from corral.network.commands import NetworkError
from corral.network.connections import open_connections_to
from corral.network.dns import upstream_resolvers
from corral.network.slots import SlotAllocator, create_slot, destroy_slot
from corral.runtime.base import (
    CheckpointInvalid,
    ContainerState,
    ExecResult,
    Prepared,
    Resources,
    Runtime,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxNotFound,
    Snapshot,
    Stats,
    TemplateNotFound,
    VolumeMount,
    read_tail,
)
from corral.runtime.gvisor import checkpointing, oci, recovery, running, snapshots, volumes
from corral.runtime.gvisor.cgroups import SandboxCgroup
from corral.runtime.gvisor.containers import Container, ContainerTable, ignore_errors, new_sandbox_id, still
from corral.runtime.gvisor.host import InstanceLock, all_alive, become_subreaper, check_host_capacity, kill_and_reap
from corral.runtime.gvisor.runsc import Runsc, RunscError, log_tail
from corral.runtime.gvisor.snapshots import GVisorSnapshot
from corral.storage.disk import DiskError, create_disk, mount_overlay, remove_tree, unmount
from corral.storage.layers import LayerNotApplicable, LayerSize, apply_layer, layer_size

log = logging.getLogger(__name__)
S = ContainerState

# runsc needs a process for `create` even when it will be replaced by a restored one.
_RESTORE_PLACEHOLDER = ["/bin/true"]
# A snapshot layer up to this size is replayed into a container prepared for its template rather than
# stacked under a new one (can_start). The copy costs a few ms and at most this much disk per sandbox or
# snapshot made from it; larger layers are stacked, so snapshot trees share them (docs/branching.md).
_REPLAY_LIMIT = LayerSize(entries=1024, bytes=2**20)
_SETUP_ERRORS = (RunscError, NetworkError, DiskError, OSError, LayerNotApplicable)


class GVisorRuntime(Runtime):
    name = "gvisor"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runsc = Runsc(settings.runsc, settings.runsc_root, settings.platform)
        self.slots = SlotAllocator(settings.instance, settings.sandbox_network)
        self.lock = InstanceLock(settings.instance)
        self.table = ContainerTable()
        self._handles: dict[str, Prepared] = {}
        self._small_layers: dict[Path, bool] = {}  # snapshot layer -> small enough to replay

    @property
    def sandboxes_dir(self) -> Path:
        return self.settings.data_dir / "sandboxes"

    @property
    def cgroup_parent(self) -> str:
        return f"/corral-{self.settings.instance}"

    # ---------------------------------------------------------------- the backend as a whole

    async def open(self) -> None:
        self.lock.acquire()
        become_subreaper()
        for d in (self.sandboxes_dir, self.settings.runsc_root):
            d.mkdir(parents=True, exist_ok=True)
        # The table is made anew with empty sets; until reconcile has put back the running sandboxes'
        # offline and egress elements, their traffic is held (else they would have the internet for a moment).
        await firewall.seal(self.settings.instance)
        try:
            await firewall.install(self.settings.instance, self.settings.sandbox_network,
                                   self.settings.dns_address, upstream_resolvers(), self.settings.service_address,
                                   self.settings.public_urls)
            await recovery.reconcile(self)
        finally:
            firewall.unseal(self.settings.instance)

    async def close(self) -> None:
        for container in self.table:
            if container.resuming is not None:  # a source left stopped by a checkpoint would stay so
                with contextlib.suppress(Exception):
                    await container.resuming
        for container in self.table.in_state(S.PREPARING, S.PREPARED, S.STARTING):
            await self._teardown(container)
        self.lock.release()

    async def destroy_all(self) -> None:
        """Destroys every sandbox (tests and `corral doctor --cleanup`) and removes the firewall table."""
        for container in self.table:
            await self._teardown(container)
        firewall.remove(self.settings.instance)
        service.remove(self.settings.instance)
        await self.close()

    async def snapshot_compat(self) -> str:
        flags = [f for f in self.runsc.global_flags if not f.startswith("--root=")]
        return f"gvisor {await self.runsc.version()} {' '.join(flags)} spec{oci.SPEC_VERSION}"

    # ---------------------------------------------------------------- snapshots

    def open_snapshot(self, path: Path) -> GVisorSnapshot:
        return snapshots.open_snapshot(path, self.settings.platform)

    recorded_lowers = staticmethod(snapshots.recorded_lowers)

    def copy_snapshot(self, source: Snapshot, path: Path) -> GVisorSnapshot:
        snapshots.link_copy(source.path, path)
        return self.open_snapshot(path)

    def in_use(self) -> frozenset[Path]:
        return frozenset(snapshots.owner_of(layer) for c in self.table for layer in c.lowers)

    def check_capacity(self, resources: Resources, snapshot: Snapshot | None = None, count: int = 1) -> None:
        image = snapshot.image if isinstance(snapshot, GVisorSnapshot) and snapshot.has_memory else None
        check_host_capacity(resources, self.sandboxes_dir, self.settings.memory_reserve_mb, image, count)

    # ---------------------------------------------------------------- containers

    async def prepare(self, snapshot: Snapshot, resources: Resources, *, cold: bool = False) -> Prepared:
        assert isinstance(snapshot, GVisorSnapshot)
        cold = cold or not snapshot.has_memory
        if cold and not snapshot.command:
            raise CheckpointInvalid(f"{snapshot.path} records no start command to cold-boot from")
        command = list(snapshot.command) if cold else _RESTORE_PLACEHOLDER
        container = await self._prepare(snapshot.template, snapshot.layers, SandboxConfig(resources=resources),
                                        command, snapshot.cwd, restores=None if cold else snapshot)
        # What the snapshot was booted with, so a sandbox restored from it can be checkpointed
        # filesystem-only too.
        container.command, container.cwd = list(snapshot.command), snapshot.cwd
        return self._handle(container)

    async def prepare_boot(self, layers: list[Path], command: list[str], resources: Resources, *,
                           template: str = "", cwd: str = "/") -> Prepared:
        for layer in layers:
            if not layer.is_dir():
                raise TemplateNotFound(f"root filesystem layer {layer} does not exist")
        container = await self._prepare(template, layers, SandboxConfig(resources=resources), command, cwd,
                                        restores=None)
        return self._handle(container)

    def _handle(self, container: Container) -> Prepared:
        handle = self._handles[container.id] = Prepared(container.id, container.snapshot,
                                                       container.config.resources)
        return handle

    async def can_start(self, prepared: Prepared, snapshot: Snapshot) -> bool:
        """Prepared for `snapshot` itself, or for the template a small snapshot's layer sits on: the layer
        is then written through the prepared root (storage/layers.py), the same filesystem as stacking it
        under a new container without the ~130 ms of preparing one."""
        base = prepared.snapshot
        if base is None or not isinstance(snapshot, GVisorSnapshot) or not snapshot.has_memory:
            return False
        if base == snapshot:
            return True
        assert isinstance(base, GVisorSnapshot)
        if list(snapshot.lowers) != base.layers:
            return False
        small = self._small_layers.get(snapshot.layer)
        if small is None:
            size = await asyncio.to_thread(layer_size, snapshot.layer, stop_after=_REPLAY_LIMIT)
            small = self._small_layers[snapshot.layer] = (size.entries <= _REPLAY_LIMIT.entries
                                                          and size.bytes <= _REPLAY_LIMIT.bytes)
        return small

    def prepared(self) -> list[Prepared]:
        return [self._handles[c.id] for c in self.table.in_state(S.PREPARED) if c.id in self._handles]

    async def discard(self, prepared: Prepared) -> None:
        container = self.table.get(prepared.id)
        if container is not None:
            await self._teardown(container)

    async def _prepare(self, template: str, lowers: list[Path], config: SandboxConfig, command: list[str],
                       cwd: str, *, restores: GVisorSnapshot | None, container: bool = True) -> Container:
        """Network slot, disk, root filesystem and a `runsc create`d container, frozen until started.
        Without `container`, everything but the `runsc create` (benchmarks time runsc on its own)."""
        self.check_capacity(config.resources)
        sid = new_sandbox_id()
        c = self.table.add(Container(id=sid, template=template, slot=self.slots.allocate(), config=config,
                                     lowers=list(lowers), dir=self.sandboxes_dir / sid, command=command, cwd=cwd,
                                     snapshot=restores))
        try:
            c.dir.mkdir(parents=True)
            await create_slot(c.slot)
            await create_disk(c.disk_image, c.disk, config.resources.disk_mb)
            await mount_overlay(c.rootfs, c.lowers, c.disk / "upper", c.disk / "work")
            await volumes.prepare(c.dir)
            spec = oci.build_spec(rootfs=c.rootfs, args=command, env=config.env, cwd=cwd,
                                  hostname=config.hostname or sid, netns=c.slot.netns_path,
                                  resources=config.resources, cgroup_path=f"{self.cgroup_parent}/{sid}",
                                  volumes=volumes.spec_mount(c.dir))
            oci.write_bundle(c.bundle, spec)
            if container:
                await self.runsc.create(sid, c.bundle, c.log)
                # A created container's gVisor kernel already idles at ~3 % of a core.
                self._cgroup(sid).freeze()
            still(c, S.PREPARING)
        except BaseException as exc:  # cancellation too: nothing half-made may stay behind
            await self._teardown(c)
            if isinstance(exc, _SETUP_ERRORS):
                raise SandboxFailed(f"preparing sandbox failed: {exc}") from exc
            raise
        self.table.move(c, S.PREPARED)
        return c

    async def start(self, prepared: Prepared, config: SandboxConfig, snapshot: Snapshot | None = None) -> Sandbox:
        c = self.table.get(prepared.id)
        if c is None or c.state is not S.PREPARED:
            raise SandboxFailed(f"container {prepared.id} is not prepared (it was started or discarded)")
        self._handles.pop(c.id, None)
        self.table.move(c, S.STARTING)
        target = snapshot or c.snapshot
        try:
            began = time.perf_counter()
            if target is not None and target != c.snapshot:
                assert isinstance(target, GVisorSnapshot)
                await asyncio.to_thread(apply_layer, target.layer, c.rootfs, keep=set(oci.ROOTFS_BIND_DIRS))
                c.command, c.cwd = list(target.command), target.cwd
            c.config = config
            await volumes.attach(c.dir, config.volumes)  # a restore re-opens the files its checkpoint had open
            self._cgroup(c.id).thaw()  # prepared containers wait frozen
            if config.low_priority:
                self._cgroup(c.id).set_cpu_weight(True)
            await running.apply_egress(self, c)
            set_up = time.perf_counter()
            if target is None:
                await self.runsc.start(c.id, c.log)
            else:
                await self.runsc.restore(c.id, c.bundle, target.image, c.log)
            log.debug("%s: set-up %.1f ms, runsc %s %.1f ms", c.id, (set_up - began) * 1000,
                      "start" if target is None else "restore", (time.perf_counter() - set_up) * 1000)
            # A restore whose flags do not match the image exits 0 with a dead sandbox (gvisor-notes §8.3).
            # Its processes are then gone or zombies; checking that costs nothing, `runsc state` ~25 ms.
            if not all_alive(self._container_pids(c.id)):
                state = await self.runsc.state(c.id)
                if state.status != "running":
                    raise RunscError(f"sandbox is {state.status} right after start; log: {log_tail(c.log)}")
            c.write_record()
            still(c, S.STARTING)
        except BaseException as exc:
            await self._teardown(c)
            if isinstance(exc, _SETUP_ERRORS):
                what = "restoring checkpoint" if target is not None else "starting sandbox"
                raise SandboxFailed(f"{what} failed: {exc}") from exc
            raise
        self.table.move(c, S.LIVE)
        return c.public()

    async def destroy(self, sandbox_id: str) -> None:
        c = self.table.get(sandbox_id)
        if c is None or c.state in (S.PREPARING, S.PREPARED):
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist")
        if c.resuming is not None:  # runsc must not be resuming what is being deleted
            with contextlib.suppress(Exception):
                await asyncio.shield(c.resuming)
        await self._teardown(c)

    async def _teardown(self, c: Container) -> None:
        """Frees everything a container holds, exactly once: the first caller moves it to TEARING_DOWN
        and runs the teardown as its own task, which a cancelled caller does not interrupt; every other
        caller waits for it to finish."""
        if c.state not in (S.TEARING_DOWN, S.GONE):
            self.table.move(c, S.TEARING_DOWN)
            self._handles.pop(c.id, None)
            c.teardown = asyncio.get_running_loop().create_task(self._free(c))
        if c.teardown is not None:
            await asyncio.shield(c.teardown)

    async def _free(self, c: Container) -> None:
        try:
            self._cgroup(c.id).thaw()  # a frozen process does not die of SIGKILL until it is thawed
            await kill_and_reap(self._container_pids(c.id))
            await ignore_errors(self.runsc.delete(c.id))
            await ignore_errors(running.drop_egress(self, c))  # the slot's next sandbox must not inherit them
            await ignore_errors(unmount(c.rootfs))
            await ignore_errors(unmount(c.disk))
            await ignore_errors(destroy_slot(c.slot))
            await ignore_errors(volumes.detach_all(c.dir))
            remove_tree(c.dir)  # never into a volume still mounted below it
        finally:
            self.slots.release(c.slot)
            self.table.move(c, S.GONE)

    # ---------------------------------------------------------------- checkpoints

    async def checkpoint(self, sandbox_id: str, directory: Path, *, leave_running: bool = True,
                         memory: bool = True) -> GVisorSnapshot:
        return await checkpointing.checkpoint(self, self.table.live(sandbox_id), directory,
                                              leave_running=leave_running, memory=memory)

    async def _settle(self, c: Container) -> None:
        """Waits for a background resume of the sandbox; raises if it failed."""
        if c.resuming is not None:
            await asyncio.shield(c.resuming)
        if (failure := c.resume_failure) is not None:
            c.resume_failure = None
            raise SandboxFailed(f"sandbox {c.id} did not resume after its checkpoint: {failure}")

    # ---------------------------------------------------------------- running sandboxes

    def list(self) -> list[Sandbox]:
        return [c.public() for c in self.table.in_state(S.LIVE, S.CHECKPOINTING)]

    def state(self, sandbox_id: str) -> ContainerState:
        c = self.table.get(sandbox_id)
        return c.state if c is not None else S.GONE

    def address(self, sandbox_id: str, port: int) -> tuple[str, int]:
        return str(self.table.live(sandbox_id).slot.guest), port

    async def exec(self, sandbox_id: str, argv: list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, timeout: float = 60,
                   on_output: Callable[[str, str], None] | None = None) -> ExecResult:
        return await running.exec_in(self, self.table.live(sandbox_id), argv, env=env, cwd=cwd, user=user,
                                     timeout=timeout, on_output=on_output)

    def _cgroup(self, sandbox_id: str) -> SandboxCgroup:
        return SandboxCgroup(f"{self.cgroup_parent}/{sandbox_id}")

    def _container_pids(self, sandbox_id: str) -> list[int]:
        """The container's host processes (sentry, gofer, stubs): everything in its cgroup."""
        return self._cgroup(sandbox_id).pids()

    def raise_priority(self, sandbox_id: str) -> None:
        self._cgroup(self.table.live(sandbox_id).id).set_cpu_weight(False)

    def freeze(self, sandbox_id: str) -> bool:
        c = self.table.live(sandbox_id)
        if c.operations or c.state is not S.LIVE:
            return False  # a checkpoint, exec or teardown is under way: it needs the sandbox running
        return self._cgroup(c.id).freeze()

    def thaw(self, sandbox_id: str) -> None:
        cgroup = self._cgroup(self.table.live(sandbox_id).id)
        if cgroup.is_frozen():
            cgroup.thaw()

    def is_frozen(self, sandbox_id: str) -> bool:
        return self._cgroup(self.table.live(sandbox_id).id).is_frozen()  # the kernel knows; no copy kept

    def host_cpu_seconds(self, sandbox_id: str) -> float | None:
        return self._cgroup(self.table.live(sandbox_id).id).cpu_seconds()

    def host_connections(self, sandbox_id: str) -> int | None:
        return open_connections_to(str(self.table.live(sandbox_id).slot.guest))

    @contextlib.contextmanager
    def _awake(self, c: Container):
        """Thaws the container and keeps it from being frozen while the block runs (runsc talks to it)."""
        c.operations += 1
        try:
            cgroup = self._cgroup(c.id)
            if cgroup.is_frozen():
                cgroup.thaw()
            yield
        finally:
            c.operations -= 1

    async def set_internet(self, sandbox_id: str, enabled: bool) -> None:
        await running.set_egress(self, self.table.live(sandbox_id), internet=enabled)

    async def attach_volumes(self, sandbox_id: str, mounts: tuple[VolumeMount, ...]) -> None:
        c = self.table.live(sandbox_id)
        await volumes.attach(c.dir, mounts)
        c.config = dataclasses.replace(c.config, volumes=(*c.config.volumes, *mounts))
        c.write_record()

    async def set_egress_rules(self, sandbox_id: str, allow: tuple[str, ...], deny: tuple[str, ...],
                               domains: tuple[str, ...] = (), rules: dict | None = None) -> None:
        await running.set_egress(self, self.table.live(sandbox_id), allow=tuple(allow), deny=tuple(deny),
                                 domains=tuple(domains), rules=dict(rules or {}))

    async def stats(self, sandbox_id: str) -> Stats:
        return await running.stats_of(self, self.table.live(sandbox_id))

    def log_tail(self, sandbox_id: str, lines: int = 20) -> str:
        c = self.table.get(sandbox_id)
        if c is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist")
        return log_tail(c.log, lines, sep="\n")

    def output(self, sandbox_id: str, max_bytes: int = 1 << 20) -> tuple[bytes, float | None]:
        if (c := self.table.get(sandbox_id)) is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist")
        return read_tail(c.log, max_bytes)  # runsc.log: runsc's messages and the console of the sandbox's init
