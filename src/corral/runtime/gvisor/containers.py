"""What the gVisor backend holds for each container; the table and its state transitions are shared by
every backend (corral.runtime.containers)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corral.network.slots import Slot
from corral.runtime.base import (
    ContainerState,
    Resources,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    Snapshot,
    Stats,
    VolumeMount,
)
from corral.runtime.containers import ALLOWED, ContainerTable, IllegalTransition

__all__ = ["ALLOWED", "Container", "ContainerTable", "IllegalTransition", "config_from_record", "ignore_errors",
           "new_sandbox_id", "still"]

log = logging.getLogger("corral.runtime.gvisor")


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

    def write_record(self) -> None:
        """Written aside and renamed: a crash leaves the old record or the new one, never half of one."""
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_record()))
        tmp.rename(self.record)


def config_from_record(data: dict) -> SandboxConfig:
    return SandboxConfig(resources=Resources(**data["resources"]), env=data["env"], labels=data["labels"],
                         internet=data["internet"], hostname=data.get("hostname"),
                         egress_allow=tuple(data.get("egress_allow", ())),
                         egress_deny=tuple(data.get("egress_deny", ())),
                         egress_domains=tuple(data.get("egress_domains", ())),
                         egress_rules=dict(data.get("egress_rules") or {}),
                         volumes=tuple(VolumeMount(**v) for v in data.get("volumes", ())))


_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_sandbox_id() -> str:
    return "i" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(19))


def still(c: Container, state: ContainerState) -> None:
    """Raises when the container left `state` while we worked on it (it was torn down meanwhile)."""
    if c.state is not state:
        raise SandboxFailed(f"container {c.id} was torn down while {state.value}")


async def ignore_errors(awaitable) -> None:
    try:
        await awaitable
    except Exception as exc:  # teardown must go on; the next reconcile retries what is left
        log.debug("teardown step failed: %s", exc)
