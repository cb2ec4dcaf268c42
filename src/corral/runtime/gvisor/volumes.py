"""Volumes in gVisor sandboxes: how a host directory reaches a sandbox that is already created, started or
restored from a checkpoint.

Every container's spec bind-mounts one fixed directory, `<container dir>/volumes`, at SANDBOX_VOLUMES_DIR
(the template's snapshot is taken with it, so every restore has the same mounts as its checkpoint). That
directory is made a shared mount of its own before `runsc create`: the gofer's mount namespace then gets
a slave copy of it, and a volume the host bind-mounts at `<container dir>/volumes/<id>` later (a sandbox
claimed from the warm pool, a container prepared ahead for a resume) shows up inside the sandbox at
SANDBOX_VOLUMES_DIR/<id>, where envd mounts it at the path asked for (envd/volumes.py). Files go through
the gofer as the sandbox's other files do, with gVisor's default shared access for mounts, so what
another sandbox or the content API writes is seen.

Before a restore the checkpoint's volumes must be mounted again (gVisor re-opens the files its checkpoint
had open); `SandboxConfig.volumes` is attached before `runsc start`/`restore` for that."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from corral.envd.volumes import SANDBOX_VOLUMES_DIR
from corral.runtime.base import VolumeMount
from corral.storage.disk import bind_mount, mounts_under, unmount

__all__ = ["SANDBOX_VOLUMES_DIR", "attach", "detach_all", "prepare", "spec_mount"]


def _root(container_dir: Path) -> Path:
    return container_dir / "volumes"


def spec_mount(container_dir: Path) -> dict:
    return {"destination": SANDBOX_VOLUMES_DIR, "type": "bind", "source": str(_root(container_dir)),
            "options": ["rbind", "rw"]}


async def prepare(container_dir: Path) -> None:
    """The container's volumes directory, a shared mount (before `runsc create`)."""
    root = _root(container_dir)
    root.mkdir(mode=0o700)
    await bind_mount(root, root, shared=True)


async def attach(container_dir: Path, volumes: tuple[VolumeMount, ...]) -> None:
    """Bind-mounts each volume's directory at `<volumes dir>/<id>` (once: attaching again is a no-op)."""
    root = _root(container_dir)
    for volume in volumes:
        target = root / volume.id
        if os.path.ismount(target):
            continue
        target.mkdir(exist_ok=True)
        if not Path(volume.source).is_dir():
            raise FileNotFoundError(f"volume {volume.id} is not mounted on the host")
        await bind_mount(Path(volume.source), target)


async def detach_all(container_dir: Path) -> None:
    """Unmounts the volumes and the volumes directory, deepest first (the volumes' own mounts stay)."""
    root = _root(container_dir)
    for mountpoint in mounts_under(root):
        with contextlib.suppress(Exception):
            await unmount(mountpoint)
    await unmount(root)
