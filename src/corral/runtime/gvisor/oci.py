"""Builds the OCI runtime spec (config.json) for one gVisor sandbox."""

from __future__ import annotations

import json
from pathlib import Path

from corral.envd.memory import host_memory_limit_mb
from corral.runtime.base import InvalidRequest, Resources

# gVisor implements these inside its own kernel; granting them does not widen the host boundary.
_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_ADMIN",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP", "CAP_SYS_ADMIN",
    "CAP_SYS_RESOURCE", "CAP_IPC_LOCK", "CAP_SYS_NICE",
]

_CPU_PERIOD_US = 100_000

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# Directories of the root filesystem that are bind-mounted into the sandbox (the gofer binds them at
# `runsc create`): anything that writes into a prepared root must keep these directories' inodes.
ROOTFS_BIND_DIRS = ("tmp",)

# Bump when the spec changes in a way a checkpoint carries (mounts, for one), or checkpoints gain a field
# sandboxes restored from them need (3: the start command, for filesystem-only checkpoints): snapshots
# taken before are rebuilt rather than restored. 4: the volumes directory (runtime/gvisor/volumes.py).
SPEC_VERSION = 4


def build_spec(*, rootfs: Path, args: list[str], env: dict[str, str], cwd: str, hostname: str,
               netns: Path, resources: Resources, cgroup_path: str, volumes: dict) -> dict:
    """`volumes`: the bind mount that brings the sandbox its volumes (gvisor/volumes.py `spec_mount`)."""
    environment = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", **env}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"{k}={v}" for k, v in environment.items()],
            "cwd": cwd,
            "capabilities": {k: _CAPABILITIES for k in ("bounding", "effective", "inheritable", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576},
                        # gVisor enforces RLIMIT_NPROC per non-root user; a host pids cgroup would
                        # count the sentry's own threads and crash it instead.
                        {"type": "RLIMIT_NPROC", "hard": resources.pids, "soft": resources.pids}],
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            # runsc puts a tmpfs on /tmp unless the spec mounts something there; that tmpfs would be
            # unbounded sandbox memory (a large file in /tmp gets the whole sandbox killed by the host's
            # memory limit). Keep /tmp on the sandbox's disk, under its quota, like the rest of the root.
            *({"destination": f"/{d}", "type": "bind", "source": str(rootfs / d), "options": ["rbind", "rw"]}
              for d in ROOTFS_BIND_DIRS),
            volumes,
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": str(netns)},
            ],
            "cgroupsPath": cgroup_path,
            "resources": {
                "memory": {"limit": host_memory_limit_mb(resources.memory_mb) * 1024 * 1024},
                "cpu": {"quota": int(resources.vcpus * _CPU_PERIOD_US), "period": _CPU_PERIOD_US},
            },
        },
    }


def exec_process(args: list[str], *, env: dict[str, str], cwd: str, uid: int, gid: int) -> dict:
    """An OCI process for `runsc exec --process`. noNewPrivileges is off as in the container's spec, but
    runsc 20240729 keeps no_new_privs set and ignores set-user-ID bits regardless; sudo inside goes
    through envd (corral/envd/sudo.py)."""
    home = "/root" if uid == 0 else "/home/user"
    environment = {"PATH": DEFAULT_PATH, "HOME": home, "LANG": "C.UTF-8", **env}
    return {
        "terminal": False,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": [f"{k}={v}" for k, v in environment.items()],
        "cwd": cwd,
        "capabilities": {k: (_CAPABILITIES if uid == 0 or k == "bounding" else [])
                         for k in ("bounding", "effective", "inheritable", "permitted")},
        "noNewPrivileges": False,
    }


def write_bundle(bundle: Path, spec: dict) -> None:
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / "config.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.rename(bundle / "config.json")


def parse_user(user: str | None) -> tuple[int, int]:
    """"uid[:gid]", or the names of the two users every template has."""
    if user in (None, "", "root"):
        return 0, 0
    if user == "user":
        return 1000, 1000
    uid, _, gid = user.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise InvalidRequest(f"user must be 'root', 'user' or 'uid[:gid]', got {user!r}") from None
