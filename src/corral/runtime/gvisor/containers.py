"""The gVisor backend's one table of containers, each with an explicit state.

A container is born PREPARING, and `ContainerTable.move` is the only way its state changes, checked
against the transitions below, so any code (teardown above all) can tell what it holds. Teardown moves a
container to TEARING_DOWN exactly once; whoever does that frees its resources, everyone else waits for
`gone`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corral.network.slots import Slot
from corral.runtime.base import (
    ContainerState,
    Resources,
    Sandbox,
    SandboxConfig,
    SandboxNotFound,
    Snapshot,
    Stats,
)

S = ContainerState
ALLOWED: dict[ContainerState, frozenset[ContainerState]] = {
    S.PREPARING: frozenset({S.PREPARED, S.TEARING_DOWN}),
    S.PREPARED: frozenset({S.STARTING, S.TEARING_DOWN}),
    S.STARTING: frozenset({S.LIVE, S.TEARING_DOWN}),
    S.LIVE: frozenset({S.CHECKPOINTING, S.TEARING_DOWN}),
    S.CHECKPOINTING: frozenset({S.LIVE, S.TEARING_DOWN}),
    S.TEARING_DOWN: frozenset({S.GONE}),
    S.GONE: frozenset(),
}


class IllegalTransition(Exception):
    """A container was asked to change state in a way its life does not allow (a bug, or a race lost)."""


@dataclass(eq=False)
class Container:
    """Everything the backend holds for one container, and where it is in its life."""

    id: str
    template: str
    slot: Slot
    config: SandboxConfig
    lowers: list[Path]
    dir: Path
    # What a cold boot runs; a filesystem-only checkpoint records it to cold-boot again.
    command: list[str] = field(default_factory=list)
    cwd: str = "/"
    created_at: float = field(default_factory=time.time)
    state: ContainerState = ContainerState.PREPARING
    snapshot: Snapshot | None = None  # what a PREPARED container was made to restore
    operations: int = 0  # runtime operations in progress that need it running (never frozen meanwhile)
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set when teardown has finished
    teardown: asyncio.Task | None = None  # the one teardown, once TEARING_DOWN
    resuming: asyncio.Task | None = None  # the background resume after a checkpoint
    resume_failure: str | None = None  # why that resume failed (the next operation reports it)
    last_stats: Stats | None = None  # what stats() read last (a frozen sandbox is not asked)

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
            "command": self.command, "cwd": self.cwd,
            "config": {**asdict(self.config), "resources": asdict(self.config.resources)},
        }


def config_from_record(data: dict) -> SandboxConfig:
    return SandboxConfig(resources=Resources(**data["resources"]), env=data["env"], labels=data["labels"],
                         internet=data["internet"], hostname=data.get("hostname"))


class ContainerTable:
    def __init__(self) -> None:
        self._containers: dict[str, Container] = {}

    def add(self, container: Container) -> Container:
        if container.id in self._containers:
            raise IllegalTransition(f"container {container.id} exists already")
        self._containers[container.id] = container
        return container

    def move(self, container: Container, to: ContainerState) -> None:
        if to not in ALLOWED[container.state]:
            raise IllegalTransition(f"container {container.id}: {container.state.value} -> {to.value}")
        container.state = to
        if to is ContainerState.GONE:
            self._containers.pop(container.id, None)
            container.gone.set()

    def get(self, container_id: str) -> Container | None:
        return self._containers.get(container_id)

    def live(self, sandbox_id: str) -> Container:
        """The sandbox `sandbox_id` (live, or being checkpointed); SandboxNotFound otherwise."""
        container = self._containers.get(sandbox_id)
        if container is None or container.state not in (ContainerState.LIVE, ContainerState.CHECKPOINTING):
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist")
        return container

    def in_state(self, *states: ContainerState) -> list[Container]:
        return [c for c in self._containers.values() if c.state in states]

    def __iter__(self) -> Iterator[Container]:
        return iter(list(self._containers.values()))

    def __len__(self) -> int:
        return len(self._containers)
