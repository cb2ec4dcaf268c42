"""The dashboard's third-party front-end files (htmx, uPlot, xterm.js, noVNC): pinned in assets.lock.json by
version and by the npm registry's `dist.integrity`, fetched at install time (scripts/install.sh runs
`python -m corral.dashboard.assets fetch`) into vendor/ beside this file, which git ignores: the repository
holds only our own code, and the server never reaches a CDN or the internet at run time.

The server serves vendor/ as it finds it and says which packages are missing (`missing()`), in its log and
on every page, instead of failing to start."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
LOCK = HERE / "assets.lock.json"
VENDOR = HERE / "vendor"
STAMP = ".corral-lock"  # in each package's directory: the name@version and integrity it was extracted from


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    dir: str  # under vendor/
    tarball: str
    integrity: str  # "sha512-<base64>", as the npm registry states it
    files: tuple[str, ...]  # paths under the tarball's package/; a trailing / takes a directory

    @property
    def stamp(self) -> str:
        return f"{self.name}@{self.version} {self.integrity}"


class IntegrityError(Exception):
    pass


def locked(lock: Path = LOCK) -> list[Package]:
    return [Package(p["name"], p["version"], p["dir"], p["tarball"], p["integrity"], tuple(p["files"]))
            for p in json.loads(lock.read_text())["packages"]]


def installed(package: Package, vendor: Path = VENDOR) -> bool:
    stamp = vendor / package.dir / STAMP
    return stamp.is_file() and stamp.read_text().strip() == package.stamp


def missing(vendor: Path = VENDOR, lock: Path = LOCK) -> list[str]:
    """name@version of each locked package that is not (or not at its locked version) in vendor/."""
    return [f"{p.name}@{p.version}" for p in locked(lock) if not installed(p, vendor)]


def check_integrity(data: bytes, integrity: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise IntegrityError(f"unsupported integrity algorithm {algorithm!r} (the lock states sha512)")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise IntegrityError(f"sha512 mismatch: the lock states {expected}, the download is {actual}")


def _wanted(member: str, files: tuple[str, ...]) -> str | None:
    """The member's path under package/ if the lock asks for it."""
    if not member.startswith("package/"):
        return None
    path = member.removeprefix("package/")
    if any(path == f or (f.endswith("/") and path.startswith(f)) for f in files):
        return path
    return None


def extract(package: Package, data: bytes, vendor: Path = VENDOR) -> None:
    """Extracts the package's files into vendor/<dir>/ (replaced as a whole, so no stale file stays)."""
    check_integrity(data, package.integrity)
    target = vendor / package.dir
    staging = vendor / f".{package.dir}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    found = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            path = _wanted(member.name, package.files)
            if path is None or not member.isfile() or ".." in Path(path).parts:
                continue
            destination = staging / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.extractfile(member).read())
            found.update(f for f in package.files if path == f or (f.endswith("/") and path.startswith(f)))
    absent = set(package.files) - found
    if absent:
        shutil.rmtree(staging)
        raise IntegrityError(f"{package.name}@{package.version} has no {', '.join(sorted(absent))}")
    (staging / STAMP).write_text(package.stamp + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as answer:
        return answer.read()


def fetch(vendor: Path = VENDOR, lock: Path = LOCK, *, log=print) -> None:
    """Downloads and extracts every locked package not yet in vendor/ at its locked version."""
    for package in locked(lock):
        if installed(package, vendor):
            continue
        log(f"    {package.name}@{package.version} from {package.tarball}")
        extract(package, download(package.tarball), vendor)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    if command == "fetch":
        try:
            fetch()
        except (OSError, IntegrityError) as e:
            print(f"fetching the dashboard's front-end packages failed: {e}", file=sys.stderr)
            return 1
        return 0
    if command == "status":
        gone = missing()
        print("missing: " + ", ".join(gone) if gone else f"all {len(locked())} packages present in {VENDOR}")
        return 1 if gone else 0
    print("usage: python -m corral.dashboard.assets [fetch | status]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
