"""How a sandbox's memory limit maps to the host limit, shared by the host (which sets it) and envd's
OOM guard inside (which enforces the sandbox's part of it). gVisor has no OOM killer of its own
(google/gvisor#1967): the host memory cgroup is the only enforcer, it counts gVisor's kernel and gofer
too, and when it fires the whole sandbox dies."""

from __future__ import annotations

# Room on top of what the sandbox asked for, for gVisor's kernel and gofer (they are counted by the host
# cgroup, not inside the sandbox; ~60-90 MB), plus 1/8 of the sandbox's memory for the kernel's own growth
# with it. Generous because it is also the time envd's OOM guard has to act: a program filling memory at
# gVisor's ~1-3 GB/s crosses 100 MB in 30-100 ms. It is a cap, not a reservation.
SENTRY_HEADROOM_MB = 192


def host_memory_limit_mb(memory_mb: int) -> int:
    """The host cgroup limit for a sandbox of `memory_mb`; inside, gVisor reports it as MemTotal."""
    return memory_mb + SENTRY_HEADROOM_MB + memory_mb // 8


# envd's OOM guard acts when what the sandbox uses reaches MemTotal (the host limit) minus this: room for
# gVisor's kernel and gofer (~60-90 MB, in the host cgroup but invisible inside) and for the guard to act
# before the host limit is hit. A sandbox thus gets memory_mb + 32 + memory_mb/8 MB before the guard acts.
GUARD_RESERVE_MB = 160


def sandbox_memory_kib(mem_total_kib: int) -> int:
    """What the sandbox itself may use, from the MemTotal it sees (at least the memory_mb it asked for)."""
    return max(0, mem_total_kib - GUARD_RESERVE_MB * 1024)
