"""envd's OOM guard: kills the largest process in the sandbox when the sandbox runs out of memory, so
that one program dies instead of the whole sandbox.

gVisor has no OOM killer (google/gvisor#1967); past its host cgroup limit the host kills gVisor's kernel
and everything in the sandbox with it. The guard watches /proc/meminfo (in gVisor, exact and cheap) and,
when what the sandbox uses reaches its own limit (`memory.sandbox_memory_kib`, below the host limit by
the kernel's headroom), SIGKILLs the process with the largest resident set, as Linux's OOM killer would.
Corral's own daemons (envd, its spawners, the code interpreter's server) and PID 1 are never chosen.
It polls every 250 ms, and every 5 ms once usage passes 60 % of the limit: a program that fills memory
at gVisor's 1-3 GB/s is stopped within the host's headroom (`memory.SENTRY_HEADROOM_MB`)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from corral.envd.memory import sandbox_memory_kib

log = logging.getLogger("corral.envd.oom")

SLOW_S, FAST_S = 0.25, 0.005
FAST_ABOVE = 0.6  # of the limit
MARGIN_KIB = 4 * 1024
KILL_WAIT_S = 5.0  # on a busy host gVisor's count of used memory lagged more than 2 s behind a kill
PROTECTED_MARKER = b"/opt/corral/envd"  # envd, its spawners and the interpreter server run from here
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def memory_use_kib() -> tuple[int, int]:
    """(used, sandbox limit) in KiB, from /proc/meminfo."""
    fields = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            if name in (b"MemTotal", b"MemAvailable"):
                fields[name] = int(rest.split()[0])
    total = fields[b"MemTotal"]
    return total - fields.get(b"MemAvailable", total), sandbox_memory_kib(total)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    return  # dead; its memory is released even before it is reaped
        except (OSError, IndexError):
            return
        time.sleep(FAST_S)


def largest_process() -> tuple[int, int, str] | None:
    """(pid, resident KiB, command) of the biggest process that may be killed."""
    me = os.getpid()
    best = None
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (1, me):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/statm", "rb") as f:
                resident = int(f.read().split()[1]) * PAGE_KIB
        except (OSError, ValueError, IndexError):
            continue
        if not cmdline or PROTECTED_MARKER in cmdline:
            continue  # kernel threads have no cmdline; Corral's daemons are not candidates
        if best is None or resident > best[1]:
            best = (int(entry), resident, cmdline.replace(b"\0", b" ").decode(errors="replace").strip()[:200])
    return best


class OomGuard(threading.Thread):
    """A thread, not a task: it must run even when envd's event loop is busy."""

    def __init__(self) -> None:
        super().__init__(name="oom-guard", daemon=True)
        self.kills: list[tuple[int, int, str]] = []

    def run(self) -> None:
        while True:
            try:
                interval = self.check()
            except (OSError, KeyError, ValueError) as e:
                log.warning("OOM guard cannot read memory use: %s", e)
                interval = 5.0
            time.sleep(interval)

    def check(self) -> float:
        used, limit = memory_use_kib()
        if limit and used >= limit - MARGIN_KIB:
            victim = largest_process()
            if victim is not None:
                pid, resident, command = victim
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return FAST_S
                self.kills.append(victim)
                log.warning("out of memory (%d of %d MiB used): killed pid %d (%s, %d MiB resident)",
                            used // 1024, limit // 1024, pid, command, resident // 1024)
                # Its memory is freed only once it is gone, and the count lags behind: until then usage
                # still reads high, and a second look would kill an innocent bystander.
                deadline = time.monotonic() + KILL_WAIT_S
                _wait_gone(pid, KILL_WAIT_S)
                while time.monotonic() < deadline and memory_use_kib()[0] >= limit - MARGIN_KIB:
                    time.sleep(FAST_S)
            return FAST_S
        return FAST_S if limit and used > FAST_ABOVE * limit else SLOW_S
