"""Host bookkeeping for the gVisor backend: who owns an instance, processes we must reap, and cleaning
up after a previous process.

An instance (Settings.instance) names a set of host objects: runsc containers under its state root,
network namespaces and veths, an nftables table, cgroups, mounts and directories. Reconciling removes the
ones no record explains, so it must only ever run in the one process that owns the instance: every
runtime takes `InstanceLock` first, and a second process is refused with a message saying who has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from corral.runtime.base import InstanceBusy, InsufficientResources, Resources
from corral.storage.disk import tree_size

DEFAULT_LOCK_DIR = Path("/run/lock/corral")


class InstanceLock:
    """An exclusive flock on `<lock_dir>/<instance>.lock`, held for the life of the runtime. The kernel
    drops it when the process dies, so a crash never leaves the instance locked."""

    def __init__(self, instance: str, lock_dir: Path | None = None) -> None:
        self.instance = instance
        self.path = (lock_dir or Path(os.environ.get("CORRAL_LOCK_DIR", DEFAULT_LOCK_DIR))) / f"{instance}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            who = f"process {holder['pid']} ({holder['command']})" if holder else "another process"
            raise InstanceBusy(
                f"Corral instance {self.instance!r} is in use by {who}. Only one process may manage an "
                f"instance's sandboxes. Use the running server (`corral sandbox ...` talks to it), stop it "
                f"first, or run this as a separate instance (CORRAL_INSTANCE, CORRAL_SANDBOX_NETWORK, "
                f"CORRAL_DATA_DIR and CORRAL_RUN_DIR of its own).") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[:3])}).encode())
        self._fd = fd

    def holder(self) -> dict | None:
        """Who holds the lock, as it wrote itself down (None when unreadable)."""
        try:
            data = json.loads(self.path.read_text())
            return {"pid": int(data["pid"]), "command": str(data.get("command", "?"))}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def held_by_other(self) -> bool:
        """Whether another process holds the lock right now (does not take it)."""
        if self._fd is not None:
            return False
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --- processes -----------------------------------------------------------------------------------


def process_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (dead, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def all_alive(pids: list[int]) -> bool:
    """True when there are processes and none is a zombie or gone."""
    return bool(pids) and all(process_running(pid) for pid in pids)


def become_subreaper() -> None:
    """Orphaned sandbox processes become our children instead of init's. `runsc delete` waits until they
    are reaped, and some inits (in VMs and containers) reap only about once a second: that was 1-1.5 s of
    every destroy. We reap them ourselves in kill_and_reap."""
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    if not _reaper_started.is_set():
        # Orphans also arrive on their own: a sandbox that exits, or every sandbox of a runtime that was
        # killed (this process is then their nearest subreaper). Unreaped, they would make any later
        # `runsc delete` of them wait forever.
        _reaper_started.set()
        threading.Thread(target=_reap_orphans_forever, name="corral-reaper", daemon=True).start()


_reaper_started = threading.Event()


def _reap_orphans_forever(interval: float = 0.5) -> None:
    """Reaps our zombie children that are sandbox processes. Those run as re-executed runsc (`exe`);
    the runsc commands we start ourselves are named `runsc` and are waited for by asyncio, never here."""
    me = os.getpid()
    while True:
        time.sleep(interval)
        try:
            entries = os.listdir("/proc")
        except OSError:
            continue
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.find("(") + 1:stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2:].split()
            if comm == "exe" and fields[0] == "Z" and int(fields[1]) == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry), os.WNOHANG)


async def until_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Waits until none of `pids` runs (gone, or a zombie its parent has yet to reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in pids if process_running(pid)]
        if not pids:
            return
        await asyncio.sleep(0.01)


async def kill_and_reap(pids: list[int], timeout: float = 5.0) -> None:
    """SIGKILLs `pids` and reaps those that are our children (see become_subreaper). Only these pids are
    waited for, never -1: asyncio's child watcher waits for its own."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:  # noqa: ASYNC222 (WNOHANG never blocks)
                    pending.discard(pid)
            except ChildProcessError:  # not our child: its own parent reaps it
                pending.discard(pid)
        if pending:
            await asyncio.sleep(0.005)


def check_host_capacity(resources: Resources, sandboxes_dir: Path, memory_reserve_mb: int, image: Path | None,
                        count: int) -> None:
    """Refuses (InsufficientResources, InvalidRequest) what does not fit on this host: more vCPUs or memory
    than it has, a disk larger than the free space, or `count` restores of a memory `image` that would
    leave less than `memory_reserve_mb` available (every clone loads the whole image privately,
    gvisor-notes §3: refused up front instead of letting the host's OOM killer pick a victim)."""
    resources.validate()
    cpus = os.cpu_count() or 1
    if resources.vcpus > cpus:
        raise InsufficientResources(f"{resources.vcpus} vCPUs requested but this host has {cpus}")
    total_mb = meminfo_mb("MemTotal")
    if resources.memory_mb > total_mb:
        raise InsufficientResources(f"{resources.memory_mb} MB of memory requested but this host has {total_mb} MB")
    sandboxes_dir.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(sandboxes_dir).free // (1024 * 1024)
    if resources.disk_mb > free_mb:
        raise InsufficientResources(f"a {resources.disk_mb} MB disk requested but only {free_mb} MB are free "
                                    f"for sandboxes")
    if image is not None:
        needed_mb = count * tree_size(image) // (1024 * 1024)
        available_mb = meminfo_mb("MemAvailable") - memory_reserve_mb
        if needed_mb > available_mb:
            raise InsufficientResources(
                f"restoring {count} sandbox(es) needs about {needed_mb} MB of memory but only "
                f"{max(0, available_mb)} MB are available (after keeping {memory_reserve_mb} MB for the host)")


def meminfo_mb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    return 0
