"""Counts the host resources a runtime instance can hold, to show that nothing is left behind."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Footprint:
    containers: int
    netns: int
    host_links: int
    mounts: int
    sandbox_dirs: int
    runsc_processes: int


def footprint(settings) -> Footprint:
    root = settings.runsc_root
    containers = 0
    if root.exists():
        out = subprocess.run(["runsc", f"--root={root}", "list", "--quiet"], capture_output=True, text=True)
        containers = len([line for line in out.stdout.splitlines() if line.strip()])
    prefix = f"corral-{settings.instance}-"
    netns = len([n for n in os.listdir("/run/netns") if n.startswith(prefix)]) if os.path.isdir("/run/netns") else 0
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    host_links = sum(1 for line in links.splitlines() if f"cr{settings.instance}h" in line)
    sandboxes = Path(settings.data_dir) / "sandboxes"
    with open("/proc/self/mountinfo") as f:
        mounts = sum(1 for line in f if line.split()[4].startswith(str(sandboxes) + "/"))
    dirs = len(list(sandboxes.iterdir())) if sandboxes.exists() else 0
    ps = subprocess.run(["pgrep", "-f", f"--root={root}"], capture_output=True, text=True).stdout
    return Footprint(containers, netns, host_links, mounts, dirs, len(ps.split()))


def empty(fp: Footprint) -> bool:
    return fp == Footprint(0, 0, 0, 0, 0, 0)
