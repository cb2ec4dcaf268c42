"""`corral doctor`: checks that this host can run sandboxes and says how to fix what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.table import Table

from corral.config import load_settings
from corral.network.dns import upstream_resolvers

INSTALL = "sudo scripts/install.sh"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def check_root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, "running as root" if ok else "runsc, netns and mounts need root", "run with sudo")


def check_runsc(binary: str) -> Check:
    path = shutil.which(binary)
    if not path:
        return Check("runsc", False, "not installed",
                     "apt-get install -t bookworm-backports runsc (or run " + INSTALL + ")")
    version = _run([binary, "--version"]).stdout.splitlines()[0]
    return Check("runsc", True, f"{path}: {version}")


def check_network_workaround(binary: str) -> Check:
    """Debian's runsc mistakes every netns for the root one on kernels >= 6.11 (google/gvisor#10704)."""
    affected = os.path.exists("/proc/sys/net/core/rmem_default")
    probe = _run(["unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
                  "mount -t tmpfs -o size=4k,mode=555 corral-netmask /proc/sys/net && "
                  "test ! -e /proc/sys/net/core/rmem_default"])
    if probe.returncode != 0:
        return Check("netns workaround", False, f"cannot mask /proc/sys/net: {probe.stderr.strip()}",
                     "needs root and util-linux's unshare")
    detail = ("kernel exposes net sysctls in every netns; runsc start/restore run with /proc/sys/net masked"
              if affected else "not needed on this kernel (masking is harmless)")
    return Check("netns workaround", True, detail)


def check_nftables() -> Check:
    if not shutil.which("nft"):
        return Check("nftables", False, "nft not installed", "apt-get install nftables")
    probe = _run(["nft", "list", "tables"])
    if probe.returncode != 0:
        return Check("nftables", False, probe.stderr.strip(), "needs root and the nf_tables kernel module")
    forward = _run(["nft", "list", "chains"]).stdout
    warn = " (another table has a forward chain with policy drop: allow cr* interfaces there)" \
        if "hook forward" in forward and "policy drop" in forward else ""
    return Check("nftables", True, "nf_tables works" + warn)


def check_overlay() -> Check:
    with open("/proc/filesystems") as f:
        fs = f.read()
    missing = [name for name in ("overlay", "ext4") if name not in fs]
    if missing:
        return Check("overlayfs", False, f"kernel lacks {', '.join(missing)}", "load the overlay and ext4 modules")
    with tempfile.TemporaryDirectory() as d:
        for sub in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(d, sub))
        probe = _run(["mount", "-t", "overlay", "overlay", "-o",
                      f"lowerdir={d}/l,upperdir={d}/u,workdir={d}/w", f"{d}/m"])
        if probe.returncode != 0:
            return Check("overlayfs", False, probe.stderr.strip(), "needs root and overlayfs")
        _run(["umount", f"{d}/m"])
    loop = os.path.exists("/dev/loop-control")
    if not loop:
        return Check("overlayfs", False, "no /dev/loop-control: sandbox disks need loop devices", "modprobe loop")
    return Check("overlayfs", True, "overlay mounts and loop devices work")


def check_cgroups() -> Check:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return Check("cgroups", True, "cgroup v2 (unified)")
    if os.path.isdir("/sys/fs/cgroup/memory"):
        if not os.path.isdir("/sys/fs/cgroup/freezer"):
            return Check("cgroups", False, "cgroup v1 without the freezer controller: idle sandboxes cannot be "
                         "frozen and keep burning CPU", "mount the freezer controller, or CORRAL_IDLE_FREEZE_S=0")
        return Check("cgroups", True, "cgroup v1/hybrid: memory and cpu limits and freezing through v1 controllers")
    return Check("cgroups", False, "no memory cgroup controller", "boot with cgroups enabled")


def check_tools() -> Check:
    # npm: template builds install Node.js itself (and Deno's kernel) from the npm registry with it.
    # ss: destroying a sandbox aborts the host's connections to its address with it.
    # skopeo, umoci: templates from OCI images pull and unpack them (templates/images.py).
    tools = ("debootstrap", "mkfs.ext4", "ip", "ss", "unshare", "chroot", "npm", "skopeo", "umoci")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        return Check("tools", False, "missing: " + ", ".join(missing), INSTALL)
    return Check("tools", True, ", ".join(tools))


def check_dns() -> Check:
    resolvers = upstream_resolvers()
    if not resolvers:
        return Check("dns", False, "no usable IPv4 resolver in /etc/resolv.conf",
                     "set CORRAL_DNS_UPSTREAM=<resolver address>")
    return Check("dns", True, "sandbox DNS is forwarded to " + ", ".join(map(str, resolvers)))


def check_disk() -> Check:
    settings = load_settings()
    path = settings.data_dir if settings.data_dir.exists() else settings.data_dir.parent
    while not path.exists():
        path = path.parent
    free_gb = shutil.disk_usage(path).free / 2**30
    ok = free_gb >= 5
    return Check("disk space", ok, f"{free_gb:.1f} GiB free at {path}",
                 "free space or set CORRAL_DATA_DIR/CORRAL_CACHE_DIR elsewhere (a template needs ~1 GiB)")


def check_forwarding() -> Check:
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        on = f.read().strip() == "1"
    return Check("ip forwarding", True, "on" if on else "off now; Corral turns it on when it starts")


def run_checks() -> list[Check]:
    settings = load_settings()
    checks = [check_root(), check_runsc(settings.runsc), check_tools(), check_cgroups(), check_dns(),
              check_disk(), check_forwarding()]
    if os.geteuid() == 0:
        checks += [check_network_workaround(settings.runsc), check_nftables(), check_overlay()]
    return checks


def doctor_command() -> None:
    """Check runsc, the netns workaround, nftables, overlayfs, cgroups, DNS and disk space."""
    console = Console()
    checks = run_checks()
    table = Table("check", "", "detail", "fix")
    for c in checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[red]missing[/red]", c.detail, "" if c.ok else c.fix)
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
