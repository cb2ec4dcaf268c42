"""The gVisor backend: every sandbox is a runsc container (systrap platform) with its own network
namespace, its own disk and a host overlayfs root over read-only template layers.

Per sandbox, on the host:
  <data>/sandboxes/<id>/disk.img     sparse ext4 image = the disk quota, mounted at disk/
  <data>/sandboxes/<id>/rootfs       overlayfs: lower = checkpoint layers + template rootfs, upper = disk/upper
  <data>/sandboxes/<id>/bundle       OCI bundle; runsc.log collects what runsc and the sandbox print
  <data>/sandboxes/<id>/record.json  written once the sandbox is up; the only thing start() adopts from
  netns corral-<instance>-<slot>     veth to the host, /30 addresses (corral.network.slots)
  runsc container <id> under <run>/runsc

A checkpoint directory holds `image/` (runsc's uncompressed memory image; absent in a filesystem-only
checkpoint), `layer/` (a copy of the sandbox's upper directory at checkpoint time) and `checkpoint.json`
(the lower layers it stands on and the command that cold-boots it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import string
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from corral.config import Settings
from corral.network import firewall
from corral.network.commands import NetworkError
from corral.network.connections import open_connections_to
from corral.network.dns import upstream_resolvers
from corral.network.slots import Slot, SlotAllocator, create_slot, destroy_slot
from corral.runtime import oci
from corral.runtime.base import (
    Checkpoint,
    CheckpointInvalid,
    ExecResult,
    InsufficientResources,
    InvalidRequest,
    Resources,
    Runtime,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxNotFound,
    TemplateNotFound,
)
from corral.runtime.base import Stats as SandboxStats
from corral.runtime.cgroups import SandboxCgroup
from corral.runtime.oci import build_spec, exec_process, write_bundle
from corral.runtime.runsc import Runsc, RunscError, log_tail
from corral.storage.disk import DiskError, create_disk, mount_overlay, mounts_under, tree_size, unmount, usage
from corral.storage.layers import LayerNotApplicable, LayerSize, apply_layer, layer_size

log = logging.getLogger(__name__)

_ID_ALPHABET = string.ascii_lowercase + string.digits
CHECKPOINT_META = "checkpoint.json"
# runsc needs a process for `create` even when it will be replaced by a restored one.
_RESTORE_PLACEHOLDER = ["/bin/true"]
# How many restores run at once; more only queue up on 2 cores (docs/gvisor-notes §4).
_RESTORE_CONCURRENCY = 4
# A checkpoint layer up to this size is replayed into a template's prepared container rather than stacked
# under a new one (_take_prepared_for). The copy costs a few ms and at most this much disk per sandbox or
# checkpoint made from it; larger layers are stacked, so checkpoint trees share them (docs/branching.md).
_REPLAY_LIMIT = LayerSize(entries=1024, bytes=2**20)
_REFILL_DELAY_S = 0.3
# Containers prepare_like makes while a fork's checkpoint is taken; fork x10 measured 1.80 s p50 with 2,
# 1.46 s with 4 and 1.71 s with 8 (5 forks each on 2 cores).
_PREPARE_ALONGSIDE = 4


def new_sandbox_id() -> str:
    return "i" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(19))


@dataclass
class _Box:
    """Everything the runtime holds for one sandbox."""

    id: str
    template: str
    slot: Slot
    config: SandboxConfig
    lowers: list[Path]
    dir: Path
    # What `boot` started; a filesystem-only checkpoint cold-boots it again.
    command: list[str] = field(default_factory=list)
    cwd: str = "/"
    created_at: float = field(default_factory=time.time)
    paused: bool = False  # by pause() (in memory): stays paused across a restart of the runtime

    @property
    def disk_image(self) -> Path:
        return self.dir / "disk.img"

    @property
    def disk(self) -> Path:
        return self.dir / "disk"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle"

    @property
    def log(self) -> Path:
        return self.dir / "runsc.log"

    @property
    def record(self) -> Path:
        return self.dir / "record.json"

    def public(self) -> Sandbox:
        return Sandbox(id=self.id, template=self.template, address=str(self.slot.guest), config=self.config,
                       created_at=self.created_at)

    def to_record(self) -> dict:
        return {
            "id": self.id, "template": self.template, "slot": self.slot.index,
            "lowers": [str(p) for p in self.lowers], "created_at": self.created_at,
            "command": self.command, "cwd": self.cwd, "paused": self.paused,
            "config": {**asdict(self.config), "resources": asdict(self.config.resources)},
        }


def _config_from_record(data: dict) -> SandboxConfig:
    return SandboxConfig(resources=Resources(**data["resources"]), env=data["env"], labels=data["labels"],
                         internet=data["internet"], hostname=data.get("hostname"))


@dataclass(frozen=True)
class _PoolKey:
    checkpoint: Path
    resources: Resources


class GVisorRuntime(Runtime):
    name = "gvisor"

    def __init__(self, settings: Settings, resolve_template: Callable[[str], Path] | None = None,
                 pool_size: int = 0) -> None:
        self.settings = settings
        self.runsc = Runsc(settings.runsc, settings.runsc_root, settings.platform)
        self.slots = SlotAllocator(settings.instance, settings.sandbox_network)
        self._resolve_template = resolve_template
        self._boxes: dict[str, _Box] = {}
        self._pool_size = pool_size
        self._pools: dict[_PoolKey, list[_Box]] = {}
        self._pool_tasks: dict[_PoolKey, asyncio.Task] = {}
        self._template_pools: dict[_PoolKey, dict] = {}  # pools kept by _ensure_pool, with their metadata
        self._resuming: dict[str, asyncio.Task] = {}  # sources resuming after a checkpoint (_settle)
        self._resume_failures: dict[str, str] = {}
        self._busy = 0  # restores and checkpoints in progress: pools refill only when there are none
        self._idle = asyncio.Event()
        self._idle.set()
        self._restore_gate = asyncio.Semaphore(_RESTORE_CONCURRENCY)
        self._started = False
        self._frozen: set[str] = set()  # frozen by freeze(): no CPU at all until thawed
        self._operating: dict[str, int] = {}  # runtime operations in progress per sandbox (never frozen)
        self._last_stats: dict[str, SandboxStats] = {}

    @property
    def sandboxes_dir(self) -> Path:
        return self.settings.data_dir / "sandboxes"

    @property
    def cgroup_parent(self) -> str:
        return f"/corral-{self.settings.instance}"

    # ---------------------------------------------------------------- host state and crash recovery

    async def start(self) -> None:
        _become_subreaper()
        for d in (self.sandboxes_dir, self.settings.runsc_root):
            d.mkdir(parents=True, exist_ok=True)
        await firewall.install(self.settings.instance, self.settings.sandbox_network,
                               self.settings.dns_address, upstream_resolvers())
        await self._reconcile()
        self._started = True

    async def _reconcile(self) -> None:
        """Adopts every sandbox a previous process left fully up; removes everything else it made."""
        records: dict[str, dict] = {}
        for entry in self.sandboxes_dir.iterdir() if self.sandboxes_dir.exists() else []:
            try:
                records[entry.name] = json.loads((entry / "record.json").read_text())
            except (OSError, ValueError):
                continue
        orphans = self.runsc.cli_processes()
        await _kill_and_reap(orphans)
        await _until_gone(orphans)
        containers = set(await self.runsc.list_ids())
        # A previous process may have left sandboxes frozen; runsc cannot talk to a frozen sandbox (and
        # a frozen process does not even die of SIGKILL), so everything is thawed before anything else.
        for sid in containers | set(records):
            self._cgroup(sid).thaw()
        netns = self.slots.existing()
        for sid, data in records.items():
            if sid in self._boxes or sid not in containers or data["slot"] not in netns:
                continue
            try:
                state = await self.runsc.state(sid)
            except RunscError:
                continue
            box = _Box(id=sid, template=data["template"], slot=self.slots.claim(data["slot"]),
                       config=_config_from_record(data["config"]), lowers=[Path(p) for p in data["lowers"]],
                       dir=self.sandboxes_dir / sid, created_at=data["created_at"],
                       command=data.get("command", []), cwd=data.get("cwd", "/"))
            if state.status in ("running", "paused") and os.path.ismount(box.rootfs):
                box.paused = bool(data.get("paused"))
                if state.status == "paused" and not box.paused:
                    # Paused only for the moment of a checkpoint when the previous process died.
                    try:
                        await self.runsc.resume(sid)
                    except RunscError as exc:
                        log.warning("sandbox %s was left paused by a checkpoint and does not resume: %s", sid, exc)
                        self.slots.release(box.slot)
                        continue
                self._boxes[sid] = box
                if not box.config.internet:
                    await firewall.set_offline(self.settings.instance, box.slot.guest, True)
            else:
                self.slots.release(box.slot)
        adopted = set(self._boxes)
        for cid in containers - adopted:
            await self._ignore_errors(self.runsc.delete(cid))
        adopted_slots = {b.slot.index for b in self._boxes.values()}
        for index in netns - adopted_slots:
            await destroy_slot(Slot(index, self.settings.instance, self.settings.sandbox_network))
        for mountpoint in mounts_under(self.sandboxes_dir):
            if mountpoint.relative_to(self.sandboxes_dir).parts[0] not in adopted:
                await self._ignore_errors(unmount(mountpoint))
        for entry in list(self.sandboxes_dir.iterdir()):
            if entry.name not in adopted:
                shutil.rmtree(entry, ignore_errors=True)
        await self._remove_stale_cgroups(adopted)

    def _container_pids(self, sandbox_id: str) -> list[int]:
        """The sandbox's host processes (sentry, gofer, stubs): everything in its cgroup."""
        root = Path("/sys/fs/cgroup")
        relative = f"{self.cgroup_parent.lstrip('/')}/{sandbox_id}/cgroup.procs"
        for procs in (root / "pids" / relative, root / relative):
            try:
                return [int(pid) for pid in procs.read_text().split()]
            except (OSError, ValueError):
                continue
        return []

    @contextlib.contextmanager
    def _busy_with(self):
        """Around a restore or checkpoint, which someone waits for; pool refills wait for none to run."""
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    def _cgroup(self, sandbox_id: str) -> SandboxCgroup:
        return SandboxCgroup(f"{self.cgroup_parent}/{sandbox_id}")

    def _set_cpu_weight(self, sandbox_id: str, low: bool) -> None:
        if not self._cgroup(sandbox_id).set_cpu_weight(low):
            log.debug("no CPU weight control for sandbox %s", sandbox_id)

    def raise_priority(self, sandbox_id: str) -> None:
        self._set_cpu_weight(sandbox_id, low=False)

    def freeze(self, sandbox_id: str) -> bool:
        box = self._box(sandbox_id)
        if self._operating.get(box.id):
            return False  # a checkpoint, exec or teardown is under way: it needs the sandbox running
        if self._cgroup(box.id).freeze():
            self._frozen.add(box.id)
            return True
        return False

    def thaw(self, sandbox_id: str) -> None:
        box = self._box(sandbox_id)
        if box.id in self._frozen:
            self._cgroup(box.id).thaw()
            self._frozen.discard(box.id)

    def is_frozen(self, sandbox_id: str) -> bool:
        return self._box(sandbox_id).id in self._frozen

    def host_cpu_seconds(self, sandbox_id: str) -> float | None:
        return self._cgroup(self._box(sandbox_id).id).cpu_seconds()

    @contextlib.contextmanager
    def _awake(self, sandbox_id: str):
        """Thaws the sandbox and keeps it from being frozen while the block runs (runsc talks to it)."""
        self._operating[sandbox_id] = self._operating.get(sandbox_id, 0) + 1
        try:
            if sandbox_id in self._frozen:
                self._cgroup(sandbox_id).thaw()
                self._frozen.discard(sandbox_id)
            yield
        finally:
            self._operating[sandbox_id] -= 1
            if not self._operating[sandbox_id]:
                del self._operating[sandbox_id]

    async def _remove_stale_cgroups(self, keep: set[str]) -> None:
        """Removes this instance's sandbox cgroups other than `keep`, killing what is still in them: a
        `runsc create` killed half-way (the server stopped during a pool refill) leaves a gVisor sandbox
        and gofer that runsc has no state for, so only their cgroup still knows them."""
        root = Path("/sys/fs/cgroup")
        parents = [root / self.cgroup_parent.lstrip("/")]
        parents += [c / self.cgroup_parent.lstrip("/") for c in root.iterdir() if c.is_dir()]
        stale = {child.name for parent in parents if parent.is_dir()
                 for child in parent.iterdir() if child.is_dir() and child.name not in keep}
        for sid in stale:
            self._cgroup(sid).thaw()
            await _kill_and_reap(self._container_pids(sid))
        # Killed processes that are not our children leave their cgroup only once they have fully exited.
        for _ in range(100):  # up to 5 s
            if not any(self._container_pids(sid) for sid in stale):
                break
            await asyncio.sleep(0.05)
        for parent in parents:
            for sid in stale:
                with contextlib.suppress(OSError):
                    (parent / sid).rmdir()

    async def close(self) -> None:
        for resuming in list(self._resuming.values()):  # a source left paused would stay paused
            with contextlib.suppress(Exception):
                await resuming
        for task in self._pool_tasks.values():
            task.cancel()
        for task in self._pool_tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pool_tasks.clear()
        for boxes in self._pools.values():
            for box in boxes:
                await self._teardown(box)
        self._pools.clear()
        self._template_pools.clear()

    async def destroy_all(self) -> None:
        """Destroys every sandbox (tests and `corral doctor --cleanup`) and removes the firewall table."""
        await self.close()
        for sid in list(self._boxes):
            await self.destroy(sid)
        firewall.remove(self.settings.instance)

    # ---------------------------------------------------------------------------- sandbox building

    def _check_capacity(self, resources: Resources) -> None:
        resources.validate()
        cpus = os.cpu_count() or 1
        if resources.vcpus > cpus:
            raise InsufficientResources(f"{resources.vcpus} vCPUs requested but this host has {cpus}")
        total_mb = _meminfo_mb("MemTotal")
        if resources.memory_mb > total_mb:
            raise InsufficientResources(f"{resources.memory_mb} MB of memory requested but this host has "
                                        f"{total_mb} MB")
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        free_mb = shutil.disk_usage(self.sandboxes_dir).free // (1024 * 1024)
        if resources.disk_mb > free_mb:
            raise InsufficientResources(f"a {resources.disk_mb} MB disk requested but only {free_mb} MB are "
                                        f"free in {self.sandboxes_dir}")

    async def _prepare(self, template: str, lowers: list[Path], config: SandboxConfig,
                       command: list[str], cwd: str = "/", *, container: bool = True) -> _Box:
        """Network slot, disk, root filesystem and a `runsc create`d container, not yet running.
        Without `container`, everything but the `runsc create` (benchmarks time runsc on its own)."""
        sid = new_sandbox_id()
        box = _Box(id=sid, template=template, slot=self.slots.allocate(), config=config, lowers=lowers,
                   dir=self.sandboxes_dir / sid, command=command, cwd=cwd)
        try:
            box.dir.mkdir(parents=True)
            await create_slot(box.slot)
            await create_disk(box.disk_image, box.disk, config.resources.disk_mb)
            await mount_overlay(box.rootfs, lowers, box.disk / "upper", box.disk / "work")
            spec = build_spec(rootfs=box.rootfs, args=command, env=config.env, cwd=cwd,
                              hostname=config.hostname or sid, netns=box.slot.netns_path,
                              resources=config.resources, cgroup_path=f"{self.cgroup_parent}/{sid}")
            write_bundle(box.bundle, spec)
            if container:
                await self.runsc.create(sid, box.bundle, box.log)
        except (RunscError, NetworkError, DiskError, OSError) as exc:
            await self._teardown(box)
            raise SandboxFailed(f"preparing sandbox failed: {exc}") from exc
        return box

    async def _go_live(self, box: _Box, *, image: Path | None) -> Sandbox:
        """Starts (or restores `image` into) a prepared container and registers it."""
        try:
            began = time.perf_counter()
            self._cgroup(box.id).thaw()  # prepared containers wait frozen
            if box.config.low_priority:
                self._set_cpu_weight(box.id, low=True)
            if not box.config.internet:
                await firewall.set_offline(self.settings.instance, box.slot.guest, True)
            set_up = time.perf_counter()
            if image is None:
                await self.runsc.start(box.id, box.log)
            else:
                async with self._restore_gate:
                    await self.runsc.restore(box.id, box.bundle, image, box.log)
            log.debug("%s: set-up %.1f ms, runsc %s %.1f ms", box.id, (set_up - began) * 1000,
                      "start" if image is None else "restore", (time.perf_counter() - set_up) * 1000)
            # A restore whose flags do not match the image exits 0 with a dead sandbox (gvisor-notes §8.3).
            # Its processes are then gone or zombies; checking that costs nothing, `runsc state` ~25 ms.
            if not _all_alive(self._container_pids(box.id)):
                state = await self.runsc.state(box.id)
                if state.status != "running":
                    raise RunscError(f"sandbox is {state.status} right after start; log: {log_tail(box.log)}")
        except (RunscError, NetworkError, OSError) as exc:
            await self._teardown(box)
            what = "restoring checkpoint" if image is not None else "starting sandbox"
            raise SandboxFailed(f"{what} failed: {exc}") from exc
        self._write_record(box)
        self._boxes[box.id] = box
        return box.public()

    @staticmethod
    def _write_record(box: _Box) -> None:
        tmp = box.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(box.to_record()))
        tmp.rename(box.record)

    async def _teardown(self, box: _Box) -> None:
        """Frees everything a box may hold; each step tolerates the resource being already gone."""
        self._boxes.pop(box.id, None)
        self._cgroup(box.id).thaw()  # a frozen process does not die of SIGKILL until it is thawed
        self._frozen.discard(box.id)
        self._last_stats.pop(box.id, None)
        await _kill_and_reap(self._container_pids(box.id))
        await self._ignore_errors(self.runsc.delete(box.id))
        if not box.config.internet:
            await self._ignore_errors(firewall.set_offline(self.settings.instance, box.slot.guest, False))
        await self._ignore_errors(unmount(box.rootfs))
        await self._ignore_errors(unmount(box.disk))
        await destroy_slot(box.slot)
        self.slots.release(box.slot)
        shutil.rmtree(box.dir, ignore_errors=True)

    @staticmethod
    async def _ignore_errors(awaitable) -> None:
        try:
            await awaitable
        except Exception as exc:  # teardown must go on; the next reconcile retries what is left
            log.debug("teardown step failed: %s", exc)

    # ------------------------------------------------------------------------------ public methods

    async def boot(self, layers: list[Path], command: list[str], config: SandboxConfig, *,
                   template: str = "", cwd: str = "/") -> Sandbox:
        self._check_capacity(config.resources)
        for layer in layers:
            if not layer.is_dir():
                raise TemplateNotFound(f"root filesystem layer {layer} does not exist")
        box = await self._prepare(template, layers, config, command, cwd)
        return await self._go_live(box, image=None)

    async def create(self, template: str, config: SandboxConfig) -> Sandbox:
        if self._resolve_template is None:
            raise TemplateNotFound("this runtime has no template store")
        checkpoint = self._resolve_template(template)
        return (await self.restore(checkpoint, 1, config, keep_prepared=True))[0]

    def address(self, sandbox_id: str, port: int) -> tuple[str, int]:
        return str(self._box(sandbox_id).slot.guest), port

    async def exec(self, sandbox_id: str, argv: list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, timeout: float = 60) -> ExecResult:
        box = self._box(sandbox_id)
        await self._settle(box.id)
        uid, gid = _parse_user(user)
        process = box.dir / f"exec-{secrets.token_hex(6)}.json"
        process.write_text(json.dumps(exec_process(argv, env=env or {}, cwd=cwd or "/", uid=uid, gid=gid)))
        try:
            with self._awake(box.id):
                code, out, err = await self.runsc.exec(box.id, process, timeout=timeout)
        except TimeoutError:
            raise SandboxFailed(f"command {argv[0]!r} did not finish within {timeout:.0f}s") from None
        finally:
            process.unlink(missing_ok=True)
        return ExecResult(exit_code=code, stdout=out, stderr=err)

    async def checkpoint(self, sandbox_id: str, directory: Path, *, leave_running: bool = True,
                         memory: bool = True) -> Checkpoint:
        sid = self._box(sandbox_id).id
        await self._settle(sid)
        with self._awake(sid), self._busy_with():
            return await self._checkpoint(sandbox_id, directory, leave_running=leave_running, memory=memory)

    async def _checkpoint(self, sandbox_id: str, directory: Path, *, leave_running: bool,
                          memory: bool) -> Checkpoint:
        box = self._box(sandbox_id)
        if directory.exists() and any(directory.iterdir()):
            raise CheckpointInvalid(f"checkpoint directory {directory} is not empty")
        if not memory and not box.command:
            raise CheckpointInvalid(f"sandbox {sandbox_id} has no recorded start command: it cannot be cold-booted "
                                    "from a filesystem-only checkpoint (rebuild its template)")
        # Build next to the target and rename at the end: a failed checkpoint never looks complete.
        staging = directory.with_name(f".{directory.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        frozen = False
        try:
            if not memory:
                # Dirty file data may still sit in the sandbox kernel's page cache; a memory image would keep
                # it, a filesystem-only checkpoint must have it on disk.
                await self.exec(sandbox_id, ["/bin/sync"], timeout=60)
            # Memory image and filesystem layer must describe the same instant: the sandbox stays frozen from
            # before the image until the upper directory is copied.
            began = time.perf_counter()
            await self.runsc.pause(box.id)
            frozen = True
            paused = time.perf_counter()
            if memory:
                await self.runsc.checkpoint(box.id, staging / "image", box.log, leave_running=True)
            imaged = time.perf_counter()
            await _copy_tree(box.disk / "upper", staging / "layer")
            log.debug("checkpoint of %s: runsc pause %.1f ms, image %.1f ms, layer copy %.1f ms", box.id,
                      (paused - began) * 1000, (imaged - paused) * 1000, (time.perf_counter() - imaged) * 1000)
            meta = {"template": box.template, "lowers": [str(p) for p in box.lowers],
                    "platform": self.settings.platform, "created_at": time.time(), "memory": memory,
                    "command": box.command, "cwd": box.cwd, "resources": asdict(box.config.resources)}
            (staging / CHECKPOINT_META).write_text(json.dumps(meta))
            directory.parent.mkdir(parents=True, exist_ok=True)
            if directory.exists():
                directory.rmdir()
            staging.rename(directory)
        except (RunscError, OSError, SandboxFailed) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if frozen:  # the source keeps running whatever went wrong, also when it was to be stopped
                with contextlib.suppress(RunscError):
                    await self.runsc.resume(box.id)
            if "no space left on device" in str(exc).lower() or getattr(exc, "errno", None) == errno.ENOSPC:
                raise InsufficientResources(f"no space left on {directory.parent} for a checkpoint of "
                                            f"{sandbox_id}; the sandbox is unchanged") from exc
            raise SandboxFailed(f"checkpoint of {sandbox_id} failed: {exc}") from exc
        if leave_running:
            self._resume_in_background(box)
        else:
            await self.destroy(sandbox_id)
        return Checkpoint(path=directory, template=box.template, size_bytes=tree_size(directory))

    def _resume_in_background(self, box: _Box) -> None:
        """Resumes a checkpointed source while the caller goes on (a fork restores its clone meanwhile):
        `runsc resume` is ~25 ms, mostly its command-line start. Operations on the sandbox wait for it
        (_settle) and it is not frozen meanwhile; traffic that arrives first waits in its network queue."""
        awake = contextlib.ExitStack()
        awake.enter_context(self._awake(box.id))  # now, not when the task first runs

        async def resume() -> None:
            with awake:
                for attempt in (1, 2):
                    try:
                        await self.runsc.resume(box.id)
                        return
                    except RunscError as exc:
                        if attempt == 2:
                            self._resume_failures[box.id] = str(exc)
                            log.error("sandbox %s did not resume after its checkpoint: %s", box.id, exc)

        task = self._resuming[box.id] = asyncio.create_task(resume())
        task.add_done_callback(lambda _: self._resuming.pop(box.id, None) if self._resuming.get(box.id) is task
                               else None)

    async def _settle(self, sandbox_id: str) -> None:
        """Waits for a background resume of the sandbox; raises if it failed."""
        task = self._resuming.get(sandbox_id)
        if task is not None:
            await asyncio.shield(task)
        if (failure := self._resume_failures.pop(sandbox_id, None)) is not None:
            raise SandboxFailed(f"sandbox {sandbox_id} did not resume after its checkpoint: {failure}")

    def _read_checkpoint(self, checkpoint: Path) -> dict:
        try:
            meta = json.loads((checkpoint / CHECKPOINT_META).read_text())
            lowers = [Path(p) for p in meta["lowers"]]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointInvalid(f"{checkpoint} is not a Corral checkpoint: {exc}") from None
        meta.setdefault("memory", True)
        if meta["memory"] and not (checkpoint / "image" / "checkpoint.img").is_file():
            raise CheckpointInvalid(f"{checkpoint} has no memory image (image/checkpoint.img)")
        for layer in [checkpoint / "layer", *lowers]:
            if not layer.is_dir():
                raise CheckpointInvalid(f"layer {layer} of checkpoint {checkpoint} is missing")
        if meta.get("platform") != self.settings.platform:
            raise CheckpointInvalid(f"checkpoint was taken on platform {meta.get('platform')}, this runtime "
                                    f"uses {self.settings.platform}")
        meta["layers"] = [checkpoint / "layer", *lowers]
        return meta

    async def restore(self, checkpoint: Path, count: int, config: SandboxConfig, *,
                      memory: bool = True, keep_prepared: bool = False) -> list[Sandbox]:
        if count < 1:
            raise CheckpointInvalid(f"count must be at least 1, got {count}")
        meta = self._read_checkpoint(checkpoint)
        self._check_capacity(config.resources)
        cold = not (memory and meta["memory"])
        if cold and not meta.get("command"):
            raise CheckpointInvalid(f"{checkpoint} records no start command to cold-boot from")
        if not cold:
            self._check_memory_for(checkpoint / "image", count)
        key = _PoolKey(checkpoint, config.resources)
        with self._busy_with():
            results = await asyncio.gather(
                *(self._cold_boot(meta, config) if cold else self._restore_one(key, meta, config)
                  for _ in range(count)),
                return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for r in results:
                if isinstance(r, Sandbox):
                    await self.destroy(r.id)
            raise failures[0]
        if keep_prepared and not cold:
            self._ensure_pool(key, meta)
        return list(results)  # type: ignore[arg-type]

    def _check_memory_for(self, image: Path, count: int) -> None:
        """Every restored clone loads the whole image into its own memory (gvisor-notes §3): refuse up front
        instead of letting the host's OOM killer pick a victim halfway through."""
        needed_mb = count * tree_size(image) // (1024 * 1024)
        available_mb = _meminfo_mb("MemAvailable") - self.settings.memory_reserve_mb
        if needed_mb > available_mb:
            raise InsufficientResources(
                f"restoring {count} sandbox(es) needs about {needed_mb} MB of memory but only {max(0, available_mb)} "
                f"MB are available (after keeping {self.settings.memory_reserve_mb} MB for the host)")

    async def _cold_boot(self, meta: dict, config: SandboxConfig) -> Sandbox:
        box = await self._prepare(meta["template"], meta["layers"], config, meta["command"], meta.get("cwd", "/"))
        return await self._go_live(box, image=None)

    async def _restore_one(self, key: _PoolKey, meta: dict, config: SandboxConfig) -> Sandbox:
        pool = self._pools.get(key)
        if pool:
            box = pool.pop()
            box.config = config
        elif (box := await self._take_prepared_for(key, meta, config)) is None:
            box = await self._prepare(meta["template"], meta["layers"], config, _RESTORE_PLACEHOLDER)
        # What the checkpointed sandbox was booted with, so that it can be checkpointed filesystem-only too.
        box.command, box.cwd = list(meta.get("command") or []), meta.get("cwd", "/")
        return await self._go_live(box, image=key.checkpoint / "image")

    def _template_pool_for(self, lowers: list[Path], resources: Resources) -> _PoolKey | None:
        """The template pool whose containers stand on exactly `lowers`, if one is kept."""
        return next((k for k, meta in self._template_pools.items()
                     if k.resources == resources and meta["layers"] == lowers), None)

    async def _prepare_frozen(self, meta: dict, resources: Resources) -> _Box:
        """A container prepared for restores of the checkpoint `meta` describes, frozen until used: a
        created container's gVisor kernel already idles at ~3 % of a core."""
        box = await self._prepare(meta["template"], meta["layers"], SandboxConfig(resources=resources),
                                  _RESTORE_PLACEHOLDER)
        self._cgroup(box.id).freeze()
        return box

    async def _take_prepared_for(self, key: _PoolKey, meta: dict, config: SandboxConfig) -> _Box | None:
        """A template's prepared container whose lower layers are this checkpoint's, with the checkpoint's
        (small) layer replayed into its root: the same filesystem as stacking the layer under a new
        container, without the ~130 ms of preparing one (storage/layers.py). None when there is none."""
        source = self._template_pool_for(meta["layers"][1:], config.resources)
        if source is None or source == key or not self._pools.get(source):
            return None
        layer = key.checkpoint / "layer"
        size = await asyncio.to_thread(layer_size, layer, stop_after=_REPLAY_LIMIT)
        if size.entries > _REPLAY_LIMIT.entries or size.bytes > _REPLAY_LIMIT.bytes:
            return None
        pool = self._pools.get(source)
        if not pool:
            return None  # taken while the layer was measured
        box = pool.pop()
        self._ensure_pool(source, self._template_pools[source], delay=_REFILL_DELAY_S)
        try:
            await asyncio.to_thread(apply_layer, layer, box.rootfs, keep=set(oci.ROOTFS_BIND_DIRS))
        except (LayerNotApplicable, OSError) as exc:
            log.info("replaying %s into a prepared container failed (%s); preparing a new one", layer, exc)
            await self._teardown(box)
            return None
        box.config = config
        return box

    def _ensure_pool(self, key: _PoolKey, meta: dict, *, delay: float = 0.0) -> None:
        """Keeps `pool_size` containers pre-created for a checkpoint, so a restore skips ~130 ms of setup."""
        if self._pool_size <= 0 or key.resources != Resources():
            return
        self._template_pools[key] = meta
        task = self._pool_tasks.get(key)
        if task is None or task.done():
            self._pool_tasks[key] = asyncio.create_task(self._fill_pool(key, meta, delay))

    async def _fill_pool(self, key: _PoolKey, meta: dict, delay: float = 0.0) -> None:
        # After a take, the sandbox that took it goes first (its restore is on someone's critical path), and
        # so do restores in progress: on a small host, preparing containers beside them slows them down.
        await asyncio.sleep(delay)
        pool = self._pools.setdefault(key, [])
        while len(pool) < self._pool_size:
            await self._idle.wait()
            pool.append(await self._prepare_frozen(meta, key.resources))

    async def prepare_restore(self, checkpoint: Path, resources: Resources) -> bool:
        meta = self._read_checkpoint(checkpoint)
        if not meta["memory"]:
            return False  # a filesystem-only checkpoint cold-boots, with no container to prepare
        self._check_capacity(resources)
        key = _PoolKey(checkpoint, resources)
        # Taken from a template's pool, it is frozen already, as pooled containers are.
        box = await self._take_prepared_for(key, meta, SandboxConfig(resources=resources))
        if box is None:
            box = await self._prepare_frozen(meta, resources)
        self._pools.setdefault(key, []).append(box)
        return True

    async def release_prepared(self, checkpoint: Path) -> None:
        for key in [k for k in self._pools if k.checkpoint == checkpoint]:
            task = self._pool_tasks.pop(key, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for box in self._pools.pop(key, []):
                await self._teardown(box)

    def host_connections(self, sandbox_id: str) -> int | None:
        return open_connections_to(str(self._box(sandbox_id).slot.guest))

    async def prepare_like(self, sandbox_id: str, count: int) -> None:
        box = self._box(sandbox_id)
        key = self._template_pool_for(box.lowers, box.config.resources)
        if key is None:
            return  # not started from a pooled template: its clones stack its layer on new containers
        pool = self._pools.setdefault(key, [])
        gate = asyncio.Semaphore(2)

        async def one() -> None:
            async with gate:
                pool.append(await self._prepare_frozen(self._template_pools[key], key.resources))

        # Only as many as can be made while the checkpoint is taken (~150 ms, two at a time): more would
        # hold up the restores that wait for this, and be left over if they fail.
        wanted = min(count, len(pool) + _PREPARE_ALONGSIDE) - len(pool)
        results = await asyncio.gather(*(one() for _ in range(max(0, wanted))), return_exceptions=True)
        for failure in (r for r in results if isinstance(r, BaseException)):
            log.info("preparing containers for clones of %s: %s", sandbox_id, failure)

    def prepared(self, checkpoint: Path) -> int:
        return sum(len(boxes) for key, boxes in self._pools.items() if key.checkpoint == checkpoint)

    async def set_internet(self, sandbox_id: str, enabled: bool) -> None:
        box = self._box(sandbox_id)
        if box.config.internet == enabled:
            return
        await firewall.set_offline(self.settings.instance, box.slot.guest, not enabled)
        box.config = replace(box.config, internet=enabled)
        self._write_record(box)

    async def pause(self, sandbox_id: str) -> None:
        box = self._box(sandbox_id)
        await self._settle(box.id)
        with self._awake(box.id):
            await self.runsc.pause(box.id)
        box.paused = True
        self._write_record(box)

    async def resume(self, sandbox_id: str) -> None:
        box = self._box(sandbox_id)
        await self._settle(box.id)
        with self._awake(box.id):
            await self.runsc.resume(box.id)
        box.paused = False
        self._write_record(box)

    async def stats(self, sandbox_id: str) -> SandboxStats:
        box = self._box(sandbox_id)
        await self._settle(box.id)
        if box.id in self._frozen:
            # runsc would ask the frozen gVisor kernel; nothing in it moved since it was frozen.
            last = self._last_stats.get(box.id, SandboxStats(0.0, 0, 0, 0))
            used, total = usage(box.disk)
            return SandboxStats(cpu_seconds=last.cpu_seconds, memory_bytes=last.memory_bytes,
                                disk_used_bytes=used, disk_total_bytes=total)
        data = (await self.runsc.events_stats(box.id)).get("data", {})
        cpu_ns = data.get("cpu", {}).get("usage", {}).get("total", 0)
        memory = data.get("memory", {}).get("usage", {}).get("usage", 0)
        used, total = usage(box.disk)
        stats = SandboxStats(cpu_seconds=cpu_ns / 1e9, memory_bytes=memory, disk_used_bytes=used,
                             disk_total_bytes=total)
        self._last_stats[box.id] = stats
        return stats

    async def state(self, sandbox_id: str) -> str:
        box = self._box(sandbox_id)
        await self._settle(box.id)
        with self._awake(box.id):
            return (await self.runsc.state(box.id)).status

    async def destroy(self, sandbox_id: str) -> None:
        box = self._box(sandbox_id)
        with contextlib.suppress(SandboxFailed):
            await self._settle(box.id)  # runsc must not be resuming what is being deleted
        self._resume_failures.pop(box.id, None)
        await self._teardown(box)

    def list(self) -> list[Sandbox]:
        return [b.public() for b in self._boxes.values()]

    def layers_in_use(self) -> set[Path]:
        boxes = [*self._boxes.values(), *(b for pool in self._pools.values() for b in pool)]
        return {layer for box in boxes for layer in box.lowers}

    async def snapshot_compat(self) -> str:
        flags = [f for f in self.runsc.global_flags if not f.startswith("--root=")]
        return f"gvisor {await self.runsc.version()} {' '.join(flags)} spec{oci.SPEC_VERSION}"

    def log_tail(self, sandbox_id: str, lines: int = 20) -> str:
        return log_tail(self._box(sandbox_id).log, lines, sep="\n")

    def _box(self, sandbox_id: str) -> _Box:
        try:
            return self._boxes[sandbox_id]
        except KeyError:
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist") from None


def _process_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (dead, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _all_alive(pids: list[int]) -> bool:
    """True when there are processes and none is a zombie or gone."""
    return bool(pids) and all(_process_running(pid) for pid in pids)


def _become_subreaper() -> None:
    """Orphaned sandbox processes become our children instead of init's. `runsc delete` waits until they
    are reaped, and some inits (in VMs and containers) reap only about once a second: that was 1-1.5 s of
    every destroy. We reap them ourselves in _kill_and_reap."""
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    if not _reaper_started.is_set():
        # Orphans also arrive on their own: a sandbox that exits, or every sandbox of a runtime that was
        # killed (this process is then their nearest subreaper). Unreaped, they would make any later
        # `runsc delete` of them wait forever.
        _reaper_started.set()
        threading.Thread(target=_reap_orphans_forever, name="corral-reaper", daemon=True).start()


_reaper_started = threading.Event()


def _reap_orphans_forever(interval: float = 0.5) -> None:
    """Reaps our zombie children that are sandbox processes. Those run as re-executed runsc (`exe`);
    the runsc commands we start ourselves are named `runsc` and are waited for by asyncio, never here."""
    me = os.getpid()
    while True:
        time.sleep(interval)
        try:
            entries = os.listdir("/proc")
        except OSError:
            continue
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.find("(") + 1:stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2:].split()
            if comm == "exe" and fields[0] == "Z" and int(fields[1]) == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry), os.WNOHANG)


async def _until_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Waits until none of `pids` runs (gone, or a zombie its parent has yet to reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in pids if _process_running(pid)]
        if not pids:
            return
        await asyncio.sleep(0.01)


async def _kill_and_reap(pids: list[int], timeout: float = 5.0) -> None:
    """SIGKILLs `pids` and reaps those that are our children (see _become_subreaper). Only these pids are
    waited for, never -1: asyncio's child watcher waits for its own."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:  # noqa: ASYNC222 (WNOHANG never blocks)
                    pending.discard(pid)
            except ChildProcessError:  # not our child: its own parent reaps it
                pending.discard(pid)
        if pending:
            await asyncio.sleep(0.005)


async def _copy_tree(src: Path, dst: Path) -> None:
    """cp -a keeps ownership, modes, xattrs and overlayfs whiteouts, which shutil does not."""
    proc = await asyncio.create_subprocess_exec(
        "cp", "-a", str(src), str(dst), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"copying {src} failed: {err.decode(errors='replace').strip()}")


def _parse_user(user: str | None) -> tuple[int, int]:
    """"uid[:gid]", or the names of the two users every template has."""
    if user in (None, "", "root"):
        return 0, 0
    if user == "user":
        return 1000, 1000
    uid, _, gid = user.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise InvalidRequest(f"user must be 'root', 'user' or 'uid[:gid]', got {user!r}") from None


def _meminfo_mb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    return 0

