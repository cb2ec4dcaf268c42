"""Volumes inside the sandbox: the host makes each volume given to this sandbox visible at
SANDBOX_VOLUMES_DIR/<id>; /init's `volumeMounts` ([{"id", "path"}]) has envd bind-mount it at the path the
user asked for. envd runs as root in the sandbox, and a bind mount (unlike a symlink) is a directory to
every program, survives checkpoints as part of the sandbox's state and is made again by the /init that
follows a cold boot."""

from __future__ import annotations

import ctypes
import os

SANDBOX_VOLUMES_DIR = "/run/corral/volumes"
_MS_BIND = 4096


class VolumeMountError(ValueError):
    pass


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].replace("\\040", " ") for line in f if len(line.split()) > 4}


def mount_volumes(mounts: list) -> None:
    """Mounts each volume at its path (made if missing); a path that is a mount point already is left as it
    is, so a repeated /init (a fork's clone, a resume) changes nothing."""
    for mount in mounts:
        if not (isinstance(mount, dict) and isinstance(mount.get("id"), str) and isinstance(mount.get("path"), str)
                and mount["path"].startswith("/") and "/" not in mount["id"] and mount["id"] not in ("", ".", "..")):
            raise VolumeMountError("volumeMounts must be a list of {id, path} with absolute paths")
    existing = _mount_points()
    libc = ctypes.CDLL(None, use_errno=True)
    for mount in mounts:
        path = os.path.normpath(mount["path"])
        if path in existing:
            continue
        source = os.path.join(SANDBOX_VOLUMES_DIR, mount["id"])
        if not os.path.isdir(source):
            raise VolumeMountError(f"volume {mount['id']} was not given to this sandbox")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise VolumeMountError(f"cannot make the mount point {path}: {e.strerror}") from None
        if libc.mount(source.encode(), path.encode(), None, _MS_BIND, None) != 0:
            err = ctypes.get_errno()
            raise VolumeMountError(f"cannot mount volume {mount['id']} at {path}: {os.strerror(err)}")
