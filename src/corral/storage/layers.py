"""Applying an overlayfs upper layer onto a mounted root filesystem, the way overlayfs would show it.

A checkpoint's filesystem layer is a copy of a sandbox's upper directory: new and changed files, and
deletions recorded the overlayfs way (a 0/0 character device is a whiteout; a directory with
`trusted.overlay.opaque=y` hides what lies below it). A sandbox started from the checkpoint normally
stacks the layer under a fresh upper. When the layer is small it can instead be written *through* an
already mounted root that has the same lower layers (a prepared container's), which gives the same
view and lets the restore skip preparing a container.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

_OPAQUE = "trusted.overlay.opaque"
# Layers written with these features cannot be replayed file by file (they refer to lower files).
_UNSUPPORTED_XATTRS = ("trusted.overlay.redirect", "trusted.overlay.metacopy")


class LayerNotApplicable(Exception):
    """The layer uses something this replay does not do; stack it as a lower layer instead."""


@dataclass(frozen=True)
class LayerSize:
    entries: int
    bytes: int


def layer_size(layer: Path, *, stop_after: LayerSize | None = None) -> LayerSize:
    """Entries and bytes in `layer`; counting stops once past `stop_after` (the caller's limit)."""
    entries = size = 0
    for directory, dirnames, filenames in os.walk(layer):
        for name in filenames + dirnames:
            entries += 1
            try:
                size += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                continue
        if stop_after is not None and (entries > stop_after.entries or size > stop_after.bytes):
            break
    return LayerSize(entries, size)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    values = {}
    for name in names:
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return values


class _Replay:
    def __init__(self, layer: Path, root: Path, keep: set[str]) -> None:
        self.layer = layer
        self.root = root
        self.keep = keep  # relative paths whose directory must stay the same inode (bind-mount sources)
        self.links: dict[tuple[int, int], str] = {}

    def run(self) -> None:
        self._directory("")

    def _remove(self, rel: str, target: str) -> None:
        if not os.path.lexists(target):
            return
        if os.path.isdir(target) and not os.path.islink(target):
            if rel in self.keep:
                raise LayerNotApplicable(f"the layer replaces /{rel}, which is mounted into the sandbox")
            shutil.rmtree(target)
        else:
            os.unlink(target)

    def _empty(self, target: str) -> None:
        for entry in os.scandir(target):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def _directory(self, rel: str) -> None:
        for entry in os.scandir(self.layer / rel if rel else self.layer):
            child = f"{rel}/{entry.name}" if rel else entry.name
            target = str(self.root / child)
            st = entry.stat(follow_symlinks=False)
            xattrs = _xattrs(entry.path)
            if any(name in xattrs for name in _UNSUPPORTED_XATTRS):
                raise LayerNotApplicable(f"/{child} uses an overlayfs redirect or metacopy")
            if _is_whiteout(st):
                self._remove(child, target)
            elif stat.S_ISDIR(st.st_mode):
                if os.path.isdir(target) and not os.path.islink(target):
                    if xattrs.get(_OPAQUE) == b"y":
                        self._empty(target)  # in place: the directory may be a bind-mount source
                else:
                    self._remove(child, target)
                    os.mkdir(target)
                self._directory(child)
                self._metadata(entry.path, target, st, xattrs)
            else:
                self._remove(child, target)
                self._file(entry.path, target, st)
                self._metadata(entry.path, target, st, xattrs)

    def _file(self, source: str, target: str, st: os.stat_result) -> None:
        if st.st_nlink > 1 and (st.st_dev, st.st_ino) in self.links:
            os.link(self.links[(st.st_dev, st.st_ino)], target)
            return
        if stat.S_ISREG(st.st_mode):
            shutil.copyfile(source, target, follow_symlinks=False)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(target)
        else:  # devices and sockets
            os.mknod(target, st.st_mode, st.st_rdev)
        if st.st_nlink > 1:
            self.links[(st.st_dev, st.st_ino)] = target

    @staticmethod
    def _metadata(source: str, target: str, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(st.st_mode))
        for name, value in xattrs.items():
            if not name.startswith("trusted.overlay."):
                # e.g. user.* xattrs on a symlink: the kernel refuses them, as it would have at the source
                with contextlib.suppress(OSError):
                    os.setxattr(target, name, value, follow_symlinks=False)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def apply_layer(layer: Path, root: Path, *, keep: set[str] = frozenset()) -> None:
    """Writes `layer` (an overlayfs upper directory) through the mounted root filesystem `root`.

    Raises LayerNotApplicable when the layer cannot be replayed (`root` may then be partly written: the
    caller discards it). Directories named in `keep` (relative paths) are emptied in place, never replaced.
    """
    _Replay(layer, root, set(keep)).run()
