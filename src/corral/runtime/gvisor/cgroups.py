"""A sandbox's host cgroup: the knobs Corral turns on it directly (runsc creates it; v1 or v2).

Everything here acts on all of the sandbox's host processes at once (gVisor's kernel, its gofer and the
stub processes), which is what makes it work where `runsc pause` does not: a paused gVisor kernel still
burns CPU, a frozen cgroup burns none."""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class SandboxCgroup:
    def __init__(self, relative: str) -> None:
        self.relative = relative.strip("/")

    def _v1(self, controller: str, name: str) -> Path:
        return ROOT / controller / self.relative / name

    def _v2(self, name: str) -> Path:
        return ROOT / self.relative / name

    def set_cpu_weight(self, low: bool) -> bool:
        """Lowest or normal CPU weight relative to other sandboxes (quotas stay as they are)."""
        return _write_first(((self._v1("cpu", "cpu.shares"), "2" if low else "1024"),
                             (self._v2("cpu.weight"), "1" if low else "100")))

    def freeze(self) -> bool:
        return _write_first(((self._v1("freezer", "freezer.state"), "FROZEN"), (self._v2("cgroup.freeze"), "1")))

    def thaw(self) -> bool:
        return _write_first(((self._v1("freezer", "freezer.state"), "THAWED"), (self._v2("cgroup.freeze"), "0")))

    def is_frozen(self) -> bool:
        for path, frozen in ((self._v1("freezer", "freezer.state"), ("FROZEN", "FREEZING")),
                             (self._v2("cgroup.freeze"), ("1",))):
            try:
                return path.read_text().strip() in frozen
            except OSError:
                continue
        return False

    def pids(self) -> list[int]:
        """Every host process in the cgroup."""
        for procs in (self._v1("pids", "cgroup.procs"), self._v2("cgroup.procs")):
            try:
                return [int(pid) for pid in procs.read_text().split()]
            except (OSError, ValueError):
                continue
        return []

    def cpu_seconds(self) -> float | None:
        """CPU time used by all of the sandbox's host processes so far."""
        for path in (self._v1("cpuacct", "cpuacct.usage"), self._v1("cpu,cpuacct", "cpuacct.usage")):
            try:
                return int(path.read_text()) / 1e9
            except (OSError, ValueError):
                continue
        try:
            for line in self._v2("cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        except (OSError, ValueError):
            pass
        return None


def _write_first(candidates: tuple[tuple[Path, str], ...]) -> bool:
    for path, value in candidates:
        try:
            path.write_text(value)
            return True
        except OSError:
            continue
    return False
