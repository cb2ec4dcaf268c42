"""GET /metrics: what the sandbox itself sees of its CPU, memory and disk."""

from __future__ import annotations

import os
import time


class CpuSampler:
    """CPU use between two calls, from /proc/stat (the first call measures since boot)."""

    def __init__(self) -> None:
        self._last = (0, 0)

    def used_percent(self) -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields)
        last_total, last_idle = self._last
        self._last = (total, idle)
        busy, span = (total - last_total) - (idle - last_idle), total - last_total
        return round(100.0 * busy / span, 2) if span > 0 else 0.0


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


def snapshot(cpu: CpuSampler) -> dict:
    mem = _meminfo()
    total = mem.get("MemTotal", 0)
    cache = mem.get("Cached", 0) + mem.get("Buffers", 0)
    used = total - mem.get("MemAvailable", mem.get("MemFree", 0))
    disk = os.statvfs("/")
    return {
        "ts": int(time.time()),
        "cpu_count": os.cpu_count() or 1,
        "cpu_used_pct": cpu.used_percent(),
        "mem_total": total,
        "mem_used": used,
        "mem_cache": cache,
        "mem_total_mib": total // (1 << 20),
        "mem_used_mib": used // (1 << 20),
        "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
        "disk_total": disk.f_blocks * disk.f_frsize,
    }
