"""Where volumes live on the host: each one its own ext4 filesystem in a sparse image of a fixed size
(the volume's quota: a full volume gives ENOSPC to whoever writes, in a sandbox or through the content
API, and cannot fill the host's disk), mounted through a loop device while the server runs.

    <data>/volumes/<id>/image   the sparse image (only written blocks take space)
    <data>/volumes/<id>/data    its mount point: the volume's root directory

Unlike a sandbox's scratch disk the filesystem has a journal: a volume holds data meant to last. Its root
belongs to uid/gid 1000 (the `user` every template has), so sandboxes' default user can write to it.
This module knows nothing of owners, names or tokens (control/volumes.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from corral.storage.disk import DiskError, make_image, mount_image, unmount

log = logging.getLogger("corral.volumes")

ROOT_UID = ROOT_GID = 1000


class VolumeStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def data(self, volume_id: str) -> Path:
        """The volume's root directory on the host (mounted while the server runs)."""
        return self.directory / volume_id / "data"

    def _image(self, volume_id: str) -> Path:
        return self.directory / volume_id / "image"

    async def create(self, volume_id: str, size_mb: int) -> None:
        home = self.directory / volume_id
        home.mkdir(parents=True)
        try:
            await make_image(self._image(volume_id), size_mb, journal=True)
            await mount_image(self._image(volume_id), self.data(volume_id))
            root = self.data(volume_id)
            shutil.rmtree(root / "lost+found", ignore_errors=True)
            os.chown(root, ROOT_UID, ROOT_GID)
            os.chmod(root, 0o755)
        except BaseException:
            await self.delete(volume_id)
            raise

    async def delete(self, volume_id: str) -> None:
        """Unmounts the volume (its loop device goes with it) and removes its files."""
        await unmount(self.data(volume_id))
        await asyncio.to_thread(shutil.rmtree, self.directory / volume_id, True)

    def mounted(self, volume_id: str) -> bool:
        return os.path.ismount(self.data(volume_id))

    async def open(self, known: dict[str, int]) -> None:
        """At start-up: mounts every known volume (id -> size in MB) not mounted yet (after a reboot), makes
        those whose image is missing (their creation was cut short), removes what belongs to no volume."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for volume_id, size_mb in known.items():
            if self.mounted(volume_id):
                continue
            if not self._image(volume_id).exists():
                log.warning("volume %s has no image (its creation was interrupted); making it empty", volume_id)
                await asyncio.to_thread(shutil.rmtree, self.directory / volume_id, True)
                await self.create(volume_id, size_mb)
                continue
            try:
                await mount_image(self._image(volume_id), self.data(volume_id))
            except DiskError as e:
                log.error("volume %s cannot be mounted: %s", volume_id, e)
        for stray in self.directory.iterdir():
            if stray.name not in known:
                log.info("removing %s: it belongs to no volume", stray.name)
                await self.delete(stray.name)
