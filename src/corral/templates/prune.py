"""Removes template builds nothing uses any more from the cache directory.

Every change to a recipe (or to envd, or an upgrade of Corral) builds new root filesystems, envd layers
and template snapshots next to the old ones, which stay: sandboxes, pauses and snapshots made from an
old build stand on its files, by absolute path. A build is still in use when it is a template's
`current` one, when a checkpoint or a sandbox record in one of the given data directories lists it
among its lower layers, or when a mounted overlay uses it (a sandbox of any instance on this host).
Everything else can go, except builds made in the last hour (a build in progress references what it
has just made only once it has finished).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.storage.disk import tree_size


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size_bytes: int


def mounted_lower_dirs(mountinfo: str = "/proc/self/mountinfo") -> set[Path]:
    """Lower directories of every overlay mounted on this host (as this mount namespace sees them)."""
    found: set[Path] = set()
    with open(mountinfo) as f:
        for line in f:
            _, _, after = line.partition(" - ")
            fields = after.split()
            if len(fields) < 3 or fields[0] != "overlay":
                continue
            for option in fields[2].split(","):
                if option.startswith("lowerdir="):
                    found |= {Path(p.replace("\\040", " ")) for p in option[len("lowerdir="):].split(":") if p}
    return found


def in_use(cache: Path, data_dirs: list[Path], *, mounted: set[Path] | None = None,
           recorded: Callable[[Path], set[Path]] | None = None) -> set[Path]:
    """Every path under `cache` something still stands on. `recorded` reads what a snapshot or sandbox
    directory stands on (the runtime's format; the gVisor backend's by default)."""
    if recorded is None:
        from corral.runtime.gvisor import GVisorRuntime

        recorded = GVisorRuntime.recorded_lowers
    used: set[Path] = set()
    # `current`, and a user-built template's `tag-<tag>` links (control/templates.py): every tagged build.
    for link in cache.glob("templates/*/*"):
        if link.is_symlink() and (link.name == "current" or link.name.startswith("tag-")):
            snapshot = link.resolve()
            used.add(snapshot)
            used |= recorded(snapshot)
    for data in data_dirs:
        for directory in (*data.glob("checkpoints/*"), *data.glob("sandboxes/*")):
            used |= recorded(directory)
    used |= mounted_lower_dirs() if mounted is None else mounted
    # A snapshot a checkpoint stands on also stands on the snapshot's own lowers.
    for path in list(used):
        for parent in (path, *path.parents):
            if parent.is_relative_to(cache) and (lowers := recorded(parent)):
                used |= lowers
                break
    return {p.resolve() for p in used}


def _builds(cache: Path) -> list[Path]:
    """Build directories under the cache; names starting with a dot are builds in progress: never listed."""
    entries = [p for p in (cache / "rootfs").glob("*") if p.is_dir()]
    entries += [p for p in (cache / "envd").glob("*") if p.is_dir()]
    for template in (cache / "templates").glob("*"):
        entries += [p for p in template.glob("*") if p.is_dir() and not p.is_symlink()]
    # Step layers of user-built templates (templates/builder.py) and images pulled for them.
    entries += [p for p in (cache / "build-layers").glob("l-*") if p.is_dir()]
    entries += [p for p in (cache / "images").glob("sha256-*") if p.is_dir()]
    return sorted(p for p in entries if not p.name.startswith("."))


def unused_builds(cache: Path, data_dirs: list[Path], *, mounted: set[Path] | None = None,
                  min_age_s: float = 3600, recorded: Callable[[Path], set[Path]] | None = None) -> list[CacheEntry]:
    used = in_use(cache, data_dirs, mounted=mounted, recorded=recorded)
    unused = []
    for build in _builds(cache):
        if time.time() - build.stat().st_mtime < min_age_s:
            continue
        resolved = build.resolve()
        if any(u == resolved or u.is_relative_to(resolved) for u in used):
            continue
        if build.name.endswith(".etc"):
            snapshot = build.with_name(build.name[: -len(".etc")]).resolve()
            if snapshot in used:
                continue
        unused.append(CacheEntry(build, tree_size(build)))
    return unused


def orphan_logs(cache: Path, *, min_age_s: float = 3600) -> list[CacheEntry]:
    """Build logs whose build is gone (failed builds leave their log for a look)."""
    return [CacheEntry(log, log.stat().st_size) for log in sorted((cache / "rootfs").glob("*.log"))
            if not log.with_suffix("").exists() and time.time() - log.stat().st_mtime >= min_age_s]


def remove(entries: list[CacheEntry]) -> int:
    """Deletes the entries (and a build log next to one); returns the bytes freed."""
    freed = 0
    for entry in entries:
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
            entry.path.with_name(entry.path.name + ".log").unlink(missing_ok=True)
        else:
            entry.path.unlink(missing_ok=True)
        freed += entry.size_bytes
    return freed
