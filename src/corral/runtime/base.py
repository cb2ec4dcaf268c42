"""The runtime interface: what the orchestrator may ask of an isolation backend.

The orchestrator talks only to `Runtime`; it never names runsc, QEMU, netns or mounts. A new backend
(e.g. a KVM microVM) is one new module that implements this class.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path


class RuntimeError_(Exception):
    """Base for errors a caller can act on; `status` is the HTTP status an API should answer with."""

    status = 500


class TemplateNotFound(RuntimeError_):
    status = 404


class SandboxNotFound(RuntimeError_):
    status = 404


class CheckpointInvalid(RuntimeError_):
    """The checkpoint directory is missing, incomplete or cannot be restored."""

    status = 400


class InsufficientResources(RuntimeError_):
    """The request asks for more than this host has (CPUs, memory, disk)."""

    status = 507


class InvalidRequest(RuntimeError_):
    status = 400


class SandboxFailed(RuntimeError_):
    """The backend failed to start, restore or checkpoint a sandbox; the message carries its log."""

    status = 500


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
class SandboxConfig:
    """What a caller asks for when creating or restoring a sandbox."""

    resources: Resources = field(default_factory=Resources)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    internet: bool = True
    hostname: str | None = None
    # Restored ahead of demand (a warm pool): its CPU, the restore included, yields to every other
    # sandbox until `raise_priority`, so refilling a pool does not slow the sandboxes users just got.
    low_priority: bool = False


@dataclass(frozen=True)
class Sandbox:
    """A running (or paused) sandbox as the runtime knows it."""

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


@dataclass(frozen=True)
class Checkpoint:
    """A frozen sandbox: memory image plus the filesystem layers it stands on."""

    path: Path
    template: str
    size_bytes: int


class Runtime(abc.ABC):
    """One isolation backend. Every method is safe to call concurrently for different sandboxes."""

    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepares host state and adopts or cleans up whatever a previous process left behind."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stops background work (pools); running sandboxes are left running for the next start()."""

    @abc.abstractmethod
    async def boot(self, layers: list[Path], command: list[str], config: SandboxConfig, *,
                   template: str = "", cwd: str = "/") -> Sandbox:
        """Cold-starts `command` on a root filesystem made of read-only `layers` (top first).

        Used to build template snapshots; sandboxes for users come from `create`/`restore`.
        """

    @abc.abstractmethod
    async def create(self, template: str, config: SandboxConfig) -> Sandbox:
        """A new sandbox from a template's snapshot (memory and filesystem as the template left them)."""

    @abc.abstractmethod
    def address(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """Host-reachable (ip, port) for a TCP port inside the sandbox."""

    @abc.abstractmethod
    async def exec(self, sandbox_id: str, argv: list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, timeout: float = 60) -> ExecResult:
        """Runs a command inside the sandbox out of band (not through envd)."""

    @abc.abstractmethod
    async def checkpoint(self, sandbox_id: str, directory: Path, *, leave_running: bool = True,
                         memory: bool = True) -> Checkpoint:
        """Freezes memory, processes and filesystem (or, with memory=False, the filesystem alone) of one
        instant into `directory`. A failed checkpoint leaves nothing in `directory` and, with leave_running,
        the sandbox running; running out of disk raises InsufficientResources."""

    @abc.abstractmethod
    async def restore(self, checkpoint: Path, count: int, config: SandboxConfig, *, memory: bool = True,
                      keep_prepared: bool = False) -> list[Sandbox]:
        """`count` independent sandboxes from one checkpoint, each with its own network and disk.

        With memory=False, or from a filesystem-only checkpoint, they cold-boot the checkpoint's recorded
        start command on its filesystem. keep_prepared asks the backend to keep setup work ready for more
        restores of this checkpoint (worth it for templates, not for one-off checkpoints)."""

    async def prepare_restore(self, checkpoint: Path, resources: Resources) -> bool:
        """Does the setup of one later `restore(checkpoint, 1, ...)` with these resources now (e.g. for a
        paused sandbox, whose resume is likely soon), held until that restore or `release_prepared`.
        Returns whether anything was prepared; backends without such setup keep this default."""
        return False

    async def release_prepared(self, checkpoint: Path) -> None:
        """Frees whatever is held ready for restores of `checkpoint`."""
        return None

    async def prepare_like(self, sandbox_id: str, count: int) -> None:
        """Prepares up to `count` containers that restores of a checkpoint of this sandbox can take (e.g.
        while the checkpoint for a fork is being made). Backends without prepared containers do nothing."""
        return None

    def host_connections(self, sandbox_id: str) -> int | None:
        """TCP connections from the host into the sandbox whose sandbox side may still be open (None: the
        backend cannot tell). A checkpoint is best taken at 0 (see orchestrator QUIESCE_S)."""
        return None

    def prepared(self, checkpoint: Path) -> int:
        """How many restores of `checkpoint` are held ready (by `prepare_restore` or a pool)."""
        return 0

    @abc.abstractmethod
    def layers_in_use(self) -> set[Path]:
        """Read-only filesystem layers that live (or prepared) sandboxes stand on and must not be removed."""

    @abc.abstractmethod
    def raise_priority(self, sandbox_id: str) -> None:
        """Gives a sandbox created with `low_priority` the same CPU weight as every other."""

    @abc.abstractmethod
    def freeze(self, sandbox_id: str) -> bool:
        """Stops every host process of the sandbox, its kernel included: no CPU at all, memory stays
        resident, and `thaw` continues it in about a millisecond. Refused (False) while a runtime
        operation on the sandbox is under way; every operation that needs it running thaws it first."""

    @abc.abstractmethod
    def thaw(self, sandbox_id: str) -> None:
        """Continues a frozen sandbox (no-op when it is not frozen)."""

    @abc.abstractmethod
    def is_frozen(self, sandbox_id: str) -> bool: ...

    @abc.abstractmethod
    def host_cpu_seconds(self, sandbox_id: str) -> float | None:
        """CPU time the sandbox's host processes used so far, read cheaply (no call into the sandbox)."""

    @abc.abstractmethod
    async def set_internet(self, sandbox_id: str, enabled: bool) -> None:
        """Allows or cuts the sandbox's egress to the internet (its isolation rules stay as they are)."""

    @abc.abstractmethod
    async def pause(self, sandbox_id: str) -> None:
        """Stops all execution; memory stays resident."""

    @abc.abstractmethod
    async def resume(self, sandbox_id: str) -> None: ...

    @abc.abstractmethod
    async def stats(self, sandbox_id: str) -> Stats: ...

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Stops the sandbox and frees everything it held; unknown ids raise SandboxNotFound."""

    @abc.abstractmethod
    def list(self) -> list[Sandbox]: ...

    @abc.abstractmethod
    async def snapshot_compat(self) -> str:
        """Changes whenever checkpoints made before can no longer be restored (version, flags)."""

    @abc.abstractmethod
    def log_tail(self, sandbox_id: str, lines: int = 20) -> str:
        """The last lines the sandbox's start command and the backend printed (for error messages)."""
