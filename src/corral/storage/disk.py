"""A sandbox disk: a sparse ext4 image mounted through a loop device.

The image size is the sandbox's disk quota. Writing past it gives ENOSPC inside the sandbox and cannot
fill the host disk (only blocks actually written take space on the host). No journal: a sandbox disk
holds scratch data and must be quick to make (~40 ms for mkfs + mount).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path


class DiskError(RuntimeError):
    pass


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise DiskError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")


async def create_disk(image: Path, mountpoint: Path, size_mb: int) -> None:
    """Makes and mounts a fresh disk; the mountpoint gets `upper/` and `work/` for an overlay."""
    free = shutil.disk_usage(image.parent).free
    if size_mb * 1024 * 1024 > free:
        raise DiskError(f"disk of {size_mb} MB requested but only {free // (1024 * 1024)} MB are free on "
                        f"{image.parent}")
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    try:
        await _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0",
                   "-E", "lazy_itable_init=1,nodiscard", str(image))
        mountpoint.mkdir(parents=True, exist_ok=True)
        await _run("mount", "-o", "loop,noatime", str(image), str(mountpoint))
    except DiskError:
        image.unlink(missing_ok=True)
        raise
    (mountpoint / "upper").mkdir()
    (mountpoint / "work").mkdir()
    shutil.rmtree(mountpoint / "lost+found", ignore_errors=True)


async def make_image(image: Path, size_mb: int, *, journal: bool) -> None:
    """A sparse ext4 image of `size_mb` (its size is the quota of what it holds), not mounted."""
    free = shutil.disk_usage(image.parent).free
    if size_mb * 1024 * 1024 > free:
        raise DiskError(f"an image of {size_mb} MB was asked for but only {free // (1024 * 1024)} MB are free")
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    try:
        await _run("mkfs.ext4", "-q", "-F", *([] if journal else ["-O", "^has_journal"]), "-m", "0",
                   "-E", "lazy_itable_init=1,nodiscard", str(image))
    except DiskError:
        image.unlink(missing_ok=True)
        raise


async def mount_image(image: Path, mountpoint: Path) -> None:
    """Mounts an image made by `make_image` through a loop device (freed again when it is unmounted)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    await _run("mount", "-o", "loop,noatime", str(image), str(mountpoint))


async def bind_mount(source: Path, target: Path, *, shared: bool = False) -> None:
    """`source` also at `target`; `shared`: mounts made below `target` later reach every copy of it (a
    mount namespace that bound it, e.g. a gVisor gofer's, sees them)."""
    await _run("mount", "--bind", str(source), str(target))
    if shared:
        await _run("mount", "--make-shared", str(target))


async def mount_overlay(target: Path, lowers: list[Path], upper: Path, work: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lowers)
    await _run("mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={lowerdir},upperdir={upper},workdir={work}", str(target))


async def unmount(path: Path) -> None:
    """Lazily unmounts if mounted; the loop device of a disk is freed by the kernel (autoclear)."""
    if os.path.ismount(path) or is_mounted(path):
        await _run("umount", "-l", str(path))


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at `path`, by the mount table: `os.path.ismount` misses a bind mount of
    a directory of the same filesystem (same device), e.g. one bound onto itself to make it shared."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == target for line in f)


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points below `prefix`, deepest first (so they can be unmounted in order)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint.startswith(str(prefix) + "/"):
                found.append(Path(mountpoint))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> bool:
    """Removes `path` and everything below it unless something is still mounted below it (a removal would
    go into that filesystem: a volume's files); False then, and nothing is removed."""
    if mounts_under(path) or os.path.ismount(path) or is_mounted(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def usage(mountpoint: Path) -> tuple[int, int]:
    """(used, total) bytes of a mounted disk."""
    st = os.statvfs(mountpoint)
    total = st.f_blocks * st.f_frsize
    return total - st.f_bfree * st.f_frsize, total


def tree_size(path: Path) -> int:
    """Bytes of disk the files under `path` occupy (allocated blocks, so sparse files count as used)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
