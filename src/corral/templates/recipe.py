"""What a template is made of. Everything that changes the result is part of its cache key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from corral.runtime.base import Resources

# Bump when the way rootfs or snapshots are built changes, so caches rebuild.
BUILDER_VERSION = 1


@dataclass(frozen=True)
class ReadyCheck:
    """A template is ready when `command` exits 0 inside it, or when TCP `port` accepts a connection."""

    command: tuple[str, ...] = ()
    port: int | None = None
    timeout_s: float = 60.0
    interval_s: float = 0.1

    def __post_init__(self) -> None:
        if not self.command and self.port is None:
            raise ValueError("a readiness check needs a command or a port")


@dataclass(frozen=True)
class Recipe:
    name: str
    start_command: tuple[str, ...]
    ready: ReadyCheck
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = ()
    # Python packages for the template's system python3 (/usr/local), installed from PyPI by the host's
    # pip (binary wheels for the template's Python), so they come through whatever index, proxy and CA the
    # host is configured with; the chroot may have no way to verify the host's TLS interception.
    pip: tuple[str, ...] = ()
    # npm packages installed globally into the template's /usr/local by the host's npm, for the same reason.
    npm: tuple[str, ...] = ()
    # Shell commands run with chroot inside the new root filesystem after the packages are in.
    setup: tuple[str, ...] = ()
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    # What the warm pool does in each sandbox it restores, before handing it out, so the pages it touches
    # are faulted back in then rather than on the user's first requests: a login-shell command, and
    # (port, path), an HTTP POST to the template's service. Not part of the cache keys: nothing built changes.
    warm_up_command: str = "true"
    warm_up: tuple[int, str] | None = None
    # What its sandboxes are created with, and its snapshot taken with.
    resources: Resources = field(default_factory=Resources)

    def rootfs_key(self) -> str:
        return _digest({"v": BUILDER_VERSION, "suite": self.suite, "mirror": self.mirror,
                        "packages": sorted(self.packages), "pip": list(self.pip), "npm": list(self.npm),
                        "setup": list(self.setup)})

    def snapshot_key(self, environment: dict) -> str:
        """`environment` holds what else shapes the snapshot: runtime platform, runsc version, DNS address."""
        # Default resources stay out of the key, so snapshots taken before it had resources are still current.
        resources = {} if self.resources == Resources() else {"resources": asdict(self.resources)}
        return _digest({"rootfs": self.rootfs_key(), "start": list(self.start_command),
                        "ready": asdict(self.ready), "workdir": self.workdir, "env": self.env, **resources,
                        **environment})


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:16]
