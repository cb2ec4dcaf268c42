"""The runtime interface: the mechanism an isolation backend offers the orchestrator.

A backend knows how to prepare a container, start it (fresh, or from a `Snapshot`), checkpoint it, run a
command in it out of band, freeze it and tear it down. It decides nothing: how many containers to keep
prepared, for which snapshot and who goes first is the orchestrator's (orchestrator/capacity.py). The
orchestrator never names runsc, QEMU, network namespaces or mounts, and nothing outside a backend opens
the files of its snapshots. A new backend (e.g. a KVM microVM) is one new package implementing `Runtime`
and `Snapshot` (docs/architecture.md).
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class RuntimeError_(Exception):
    """Base for errors a caller can act on; `status` is the HTTP status an API should answer with."""

    status = 500
    # Whether the message may name this host's files (hidden from clients: control/errors.py); False for
    # messages that name only paths inside the sandbox.
    names_host_paths = True


class TemplateNotFound(RuntimeError_):
    status = 404


class SandboxNotFound(RuntimeError_):
    status = 404


class CheckpointInvalid(RuntimeError_):
    """The checkpoint is missing, incomplete or cannot be restored."""

    status = 400


class InsufficientResources(RuntimeError_):
    """The request asks for more than this host has (CPUs, memory, disk)."""

    status = 507


class InvalidRequest(RuntimeError_):
    status = 400


class SandboxFailed(RuntimeError_):
    """The backend failed to start, restore or checkpoint a sandbox; the message carries its log."""

    status = 500


class CheckpointRefused(RuntimeError_):
    """The sandbox is in a state the backend cannot checkpoint (for gVisor: a process keeps a deleted file
    open); it is unchanged and a later attempt may succeed. The message names the file in the sandbox."""

    status = 409
    names_host_paths = False


class InstanceBusy(RuntimeError_):
    """Another process owns this instance's host state (containers, networks, mounts)."""

    status = 503


@dataclass(frozen=True)
class Resources:
    vcpus: float = 2
    memory_mb: int = 512
    disk_mb: int = 2048
    pids: int = 1024

    def validate(self) -> None:
        if not 0 < self.vcpus <= 256:
            raise InvalidRequest(f"vcpus must be in (0, 256], got {self.vcpus}")
        if self.memory_mb < 64:
            raise InvalidRequest(f"memory_mb must be at least 64, got {self.memory_mb}")
        if self.disk_mb < 64:
            raise InvalidRequest(f"disk_mb must be at least 64, got {self.disk_mb}")
        if self.pids < 16:
            raise InvalidRequest(f"pids must be at least 16, got {self.pids}")


@dataclass(frozen=True)
class VolumeMount:
    """A volume a sandbox mounts: the host directory `source` (the volume's root), which envd mounts at
    `path` inside the sandbox; `id` names it among the sandbox's volumes."""

    id: str
    source: str
    path: str


@dataclass(frozen=True)
class SandboxConfig:
    """What a caller asks for when starting a sandbox."""

    resources: Resources = field(default_factory=Resources)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    internet: bool = True
    # Egress rules by address (CIDRs): `egress_allow` is reachable even with the internet off, and wins over
    # `egress_deny`; neither opens private ranges, the host or other sandboxes.
    egress_allow: tuple[str, ...] = ()
    egress_deny: tuple[str, ...] = ()
    # Domain names its connections to ports 80 and 443 may go to (by Host and SNI, through the host's egress
    # proxy); with any, those ports go through the proxy, which applies the address rules to the rest.
    egress_domains: tuple[str, ...] = ()
    # Header rules (host pattern -> header -> template) the egress proxy applies; they grant nothing.
    egress_rules: dict[str, dict[str, str]] = field(default_factory=dict)
    hostname: str | None = None
    # Volumes to mount (docs/volumes.md); the runtime makes each one's `source` visible to the sandbox.
    volumes: tuple[VolumeMount, ...] = ()
    # Started ahead of demand (a warm pool): its CPU, the start included, yields to every other sandbox
    # until `raise_priority`, so refilling a pool does not slow the sandboxes users just got.
    low_priority: bool = False


@dataclass(frozen=True)
class Sandbox:
    """A running sandbox as the runtime knows it."""

    id: str
    template: str
    address: str  # IPv4 address at which the host reaches TCP ports inside the sandbox
    config: SandboxConfig
    created_at: float


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Stats:
    cpu_seconds: float  # CPU time used by the sandbox so far (all its host processes)
    memory_bytes: int  # memory in use inside the sandbox
    disk_used_bytes: int
    disk_total_bytes: int


class Snapshot(abc.ABC):
    """A sandbox's state at one instant, as a value: its memory (unless dropped or never taken) and its
    filesystem. Only the backend that made it reads or changes its files."""

    path: Path  # the directory it lives in (owned by the backend's format)
    template: str

    @property
    @abc.abstractmethod
    def has_memory(self) -> bool:
        """Whether starting from it continues its processes (True) or cold-boots its filesystem."""

    @property
    @abc.abstractmethod
    def stands_on(self) -> frozenset[Path]:
        """Other snapshot directories and template files it needs: they must outlive it."""

    @property
    @abc.abstractmethod
    def layers(self):
        """The read-only filesystem layers (top first) a container started from it mounts; a template build
        stacks its steps' layers on them (templates/builder.py)."""

    @property
    @abc.abstractmethod
    def size_bytes(self) -> int: ...

    @abc.abstractmethod
    def drop_memory(self) -> int:
        """Deletes the memory image, keeping the filesystem (it then cold-boots); returns bytes freed."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"


class ContainerState(enum.Enum):
    """Where a container is in its life; a backend's table of containers is the only place it changes."""

    PREPARING = "preparing"  # network, disk, root filesystem, the container process being made
    PREPARED = "prepared"  # made and frozen, waiting to be started (no CPU)
    STARTING = "starting"  # being started or restored
    LIVE = "live"  # a running sandbox
    CHECKPOINTING = "checkpointing"  # stopped for the moment a checkpoint is taken
    TEARING_DOWN = "tearing down"  # on its way out; teardown can be repeated and always finishes
    GONE = "gone"


@dataclass(frozen=True)
class Prepared:
    """A prepared container: the handle `prepare` gives and `start` or `discard` take back."""

    id: str
    snapshot: Snapshot | None  # what it was prepared to start from (None: a cold boot of `boot` layers)
    resources: Resources


class Runtime(abc.ABC):
    """One isolation backend. Every method is safe to call concurrently, also for the same sandbox."""

    name: str

    # --- the backend as a whole ------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Takes the instance (refusing with InstanceBusy when another process has it), prepares host state
        and adopts or cleans up whatever a previous process left behind."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Frees prepared containers and lets go of the instance; live sandboxes keep running for the next
        open()."""

    @abc.abstractmethod
    async def snapshot_compat(self) -> str:
        """Changes whenever snapshots made before can no longer be restored (version, flags)."""

    # --- snapshots -------------------------------------------------------------------------------

    @abc.abstractmethod
    def open_snapshot(self, path: Path) -> Snapshot:
        """The snapshot stored at `path`; CheckpointInvalid when there is none or it is incomplete."""

    @staticmethod
    def recorded_lowers(directory: Path) -> set[Path]:
        """The template and snapshot files that a snapshot directory or a sandbox's directory of this
        backend stands on, read without opening the backend (`corral template prune` runs beside servers)."""
        return set()

    @abc.abstractmethod
    def copy_snapshot(self, source: Snapshot, path: Path) -> Snapshot:
        """A second snapshot at `path` with the same content, sharing files where it can."""

    @abc.abstractmethod
    def check_capacity(self, resources: Resources, snapshot: Snapshot | None = None, count: int = 1) -> None:
        """Raises InsufficientResources (or InvalidRequest) when `count` sandboxes with `resources`, started
        from `snapshot`, do not fit on this host right now; cheap, called before any work is done."""

    @abc.abstractmethod
    def in_use(self) -> frozenset[Path]:
        """Snapshot directories and template files that live or prepared containers stand on."""

    # --- containers ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def prepare(self, snapshot: Snapshot, resources: Resources, *, cold: bool = False) -> Prepared:
        """Everything a start from `snapshot` needs that does not depend on its memory, done ahead; the
        container then waits frozen. With `cold` (or a snapshot without memory) it will cold-boot the
        snapshot's filesystem instead. A failed or cancelled prepare leaves nothing behind."""

    @abc.abstractmethod
    async def prepare_boot(self, layers: list[Path], command: list[str], resources: Resources, *,
                           template: str = "", cwd: str = "/") -> Prepared:
        """A container that cold-boots `command` on read-only `layers` (top first): how templates are
        built. Sandboxes for users start from snapshots."""

    @abc.abstractmethod
    async def can_start(self, prepared: Prepared, snapshot: Snapshot) -> bool:
        """Whether `start(prepared, config, snapshot)` works: `snapshot` is the one `prepared` was made for,
        or one the backend can adapt it to cheaply (e.g. a small snapshot of a sandbox of that template)."""

    @abc.abstractmethod
    async def start(self, prepared: Prepared, config: SandboxConfig, snapshot: Snapshot | None = None) -> Sandbox:
        """Starts a prepared container: restores `snapshot` (default: the one it was prepared for) or
        cold-boots. On failure the container is torn down and SandboxFailed raised."""

    @abc.abstractmethod
    async def discard(self, prepared: Prepared) -> None:
        """Tears down a prepared container that will not be started (idempotent)."""

    @abc.abstractmethod
    def prepared(self) -> list[Prepared]:
        """Containers prepared and not yet started or discarded."""

    @abc.abstractmethod
    async def checkpoint(self, sandbox_id: str, directory: Path, *, leave_running: bool = True,
                         memory: bool = True) -> Snapshot:
        """Freezes memory, processes and filesystem (or, with memory=False, the filesystem alone) of one
        instant into `directory`. A failed checkpoint leaves nothing in `directory` and, with leave_running,
        the sandbox running; running out of disk raises InsufficientResources."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Stops the sandbox and frees everything it held. Unknown ids raise SandboxNotFound; a destroy
        while another is under way waits for it and returns (each resource is freed exactly once)."""

    # --- running sandboxes -----------------------------------------------------------------------

    @abc.abstractmethod
    def list(self) -> list[Sandbox]: ...

    @abc.abstractmethod
    def state(self, sandbox_id: str) -> ContainerState: ...

    @abc.abstractmethod
    def address(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """Host-reachable (ip, port) for a TCP port inside the sandbox."""

    @abc.abstractmethod
    async def exec(self, sandbox_id: str, argv: list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, timeout: float = 60,
                   on_output: Callable[[str, str], None] | None = None) -> ExecResult:
        """Runs a command inside the sandbox out of band (not through envd). With `on_output`, each line of
        output goes there as `(stream name, line)` while it runs, and the result holds no output."""

    @abc.abstractmethod
    def raise_priority(self, sandbox_id: str) -> None:
        """Gives a sandbox started with `low_priority` the same CPU weight as every other."""

    @abc.abstractmethod
    def freeze(self, sandbox_id: str) -> bool:
        """Stops the sandbox entirely: no CPU at all, memory stays resident, and `thaw` continues it in
        about a millisecond. Refused (False) while a runtime operation on the sandbox is under way; every
        operation that needs it running thaws it first."""

    @abc.abstractmethod
    def thaw(self, sandbox_id: str) -> None:
        """Continues a frozen sandbox (no-op when it is not frozen)."""

    @abc.abstractmethod
    def is_frozen(self, sandbox_id: str) -> bool: ...

    @abc.abstractmethod
    def host_cpu_seconds(self, sandbox_id: str) -> float | None:
        """CPU time the sandbox used so far, read cheaply (no call into the sandbox)."""

    def host_connections(self, sandbox_id: str) -> int | None:
        """TCP connections from the host into the sandbox whose sandbox side may still be open (None: the
        backend cannot tell). A checkpoint is best taken at 0 (see orchestrator QUIESCE_S)."""
        return None

    @abc.abstractmethod
    async def set_internet(self, sandbox_id: str, enabled: bool) -> None:
        """Allows or cuts the sandbox's egress to the internet (its isolation rules stay as they are)."""

    @abc.abstractmethod
    async def set_egress_rules(self, sandbox_id: str, allow: tuple[str, ...], deny: tuple[str, ...],
                               domains: tuple[str, ...] = (), rules: dict | None = None) -> None:
        """Replaces the sandbox's egress rules (see SandboxConfig); from its next connection."""

    async def attach_volumes(self, sandbox_id: str, volumes: tuple[VolumeMount, ...]) -> None:
        """Makes volumes visible to a running sandbox (one started without them, e.g. from a warm pool), for
        envd to mount; a start mounts `SandboxConfig.volumes` itself."""
        raise InvalidRequest(f"the {self.name} runtime cannot mount volumes")

    def sandbox_at(self, address: str) -> Sandbox | None:
        """The live sandbox with this address (the egress proxy asks whose connection it holds)."""
        return next((sb for sb in self.list() if sb.address == address), None)

    @abc.abstractmethod
    async def stats(self, sandbox_id: str) -> Stats: ...

    @abc.abstractmethod
    def log_tail(self, sandbox_id: str, lines: int = 20) -> str:
        """The last lines the sandbox's start command and the backend printed (for error messages)."""

    def output(self, sandbox_id: str, max_bytes: int = 1 << 20) -> tuple[bytes, float | None]:
        """The last `max_bytes` (whole lines) of what the sandbox's init printed and the backend logged about
        it, and when that was last written (None: never). For the sandbox logs endpoint; a backend that
        keeps no such log has none."""
        return b"", None

    # --- conveniences built on the above (no pooling: that is the orchestrator's) -------------------

    async def boot(self, layers: list[Path], command: list[str], config: SandboxConfig, *,
                   template: str = "", cwd: str = "/") -> Sandbox:
        """Cold-starts `command` on read-only `layers` (top first)."""
        prepared = await self.prepare_boot(layers, command, config.resources, template=template, cwd=cwd)
        return await self.start(prepared, config)

    async def restore(self, snapshot: Snapshot, count: int, config: SandboxConfig, *,
                      memory: bool = True) -> list[Sandbox]:
        """`count` independent sandboxes from one snapshot, each with its own network and disk; all or
        none (on a failure the ones already started are destroyed)."""
        import asyncio

        if count < 1:
            raise CheckpointInvalid(f"count must be at least 1, got {count}")
        self.check_capacity(config.resources, snapshot if memory else None, count)

        async def one() -> Sandbox:
            prepared = await self.prepare(snapshot, config.resources, cold=not memory)
            return await self.start(prepared, config)

        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for r in results:
                if isinstance(r, Sandbox):
                    await self.destroy(r.id)
            raise failures[0]
        return list(results)  # type: ignore[arg-type]


def read_tail(path: Path, max_bytes: int) -> tuple[bytes, float | None]:
    """The last `max_bytes` of a log file, from the start of a line, and its modification time; nothing
    (and None) when there is no such file."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            cut = info.st_size > max_bytes
            f.seek(info.st_size - max_bytes if cut else 0)
            data = f.read(max_bytes)
    except FileNotFoundError:
        return b"", None
    if cut:
        data = data.partition(b"\n")[2]
    return data, info.st_mtime
