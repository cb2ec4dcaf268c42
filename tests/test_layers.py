"""Replaying an overlayfs upper layer through a mounted root gives the view stacking it would give."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from corral.storage.layers import LayerNotApplicable, apply_layer, layer_size


def mount_overlay(target: Path, lowers: list[Path], upper: Path | None = None, work: Path | None = None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    options = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None:
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        options += f",upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)], check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


def view(root: Path) -> dict:
    """Everything a process would see under `root`."""
    seen = {}
    inodes: dict[int, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "owner": (st.st_uid, st.st_gid)}
            if stat.S_ISREG(st.st_mode):
                entry["data"] = Path(path).read_bytes()
                entry["mtime"] = st.st_mtime_ns
                if st.st_nlink > 1:
                    entry["same_as"] = inodes.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            if not stat.S_ISLNK(st.st_mode):
                entry["xattrs"] = {n: os.getxattr(path, n) for n in os.listxattr(path) if n.startswith("user.")}
            seen[rel] = entry
    return seen


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    for mountpoint in sorted((p for p in tmp_path.rglob("*") if os.path.ismount(p)), reverse=True):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def build_lower(lower: Path) -> None:
    (lower / "etc" / "app").mkdir(parents=True)
    (lower / "etc" / "app" / "a.conf").write_text("lower a")
    (lower / "etc" / "app" / "b.conf").write_text("lower b")
    (lower / "etc" / "keep.txt").write_text("kept")
    (lower / "gone").mkdir()
    (lower / "gone" / "file").write_text("x")
    (lower / "tmp").mkdir(mode=0o1777)
    (lower / "tmp" / "old").write_text("old tmp file")
    (lower / "replaced").write_text("a file that becomes a directory")


def change_through(merged: Path) -> None:
    """What a sandbox's processes might do; each of these leaves its own mark in the upper layer."""
    (merged / "etc" / "app" / "a.conf").write_text("changed a")  # copy-up
    (merged / "etc" / "app" / "b.conf").unlink()  # whiteout
    subprocess.run(["rm", "-rf", str(merged / "gone")], check=True)  # whiteout of a directory
    subprocess.run(["rm", "-rf", str(merged / "etc" / "app")], check=True)
    (merged / "etc" / "app").mkdir()  # opaque directory
    (merged / "etc" / "app" / "new.conf").write_text("fresh")
    (merged / "tmp" / "old").unlink()
    (merged / "tmp" / "new").write_text("new tmp file")
    (merged / "replaced").unlink()
    (merged / "replaced").mkdir()
    (merged / "replaced" / "inside").write_text("now a directory")
    home = merged / "home" / "user"
    home.mkdir(parents=True)
    (home / "data.bin").write_bytes(os.urandom(70_000))
    os.link(home / "data.bin", home / "data-link.bin")
    (home / "link").symlink_to("data.bin")
    os.mkfifo(home / "pipe")
    (home / "script.sh").write_text("#!/bin/sh\n")
    (home / "script.sh").chmod(0o750)
    os.chown(home, 1000, 1000)
    os.chown(home / "script.sh", 1000, 1000)
    os.setxattr(home / "script.sh", "user.e2b.note", b"kept")


def test_replayed_layer_gives_the_same_view_as_a_stacked_one(scratch):
    lower = scratch / "lower"
    build_lower(lower)
    first = scratch / "first"
    mount_overlay(first, [lower], scratch / "upper", scratch / "work")
    change_through(first)
    umount(first)
    layer = scratch / "upper"
    # The layer really has whiteouts and an opaque directory to replay.
    assert stat.S_ISCHR(os.lstat(layer / "etc" / "app").st_mode) is False
    assert os.getxattr(layer / "etc" / "app", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(layer / "gone").st_mode)

    stacked = scratch / "stacked"
    mount_overlay(stacked, [layer, lower])
    replayed = scratch / "replayed"
    mount_overlay(replayed, [lower], scratch / "upper2", scratch / "work2")
    apply_layer(layer, replayed, keep={"tmp"})
    assert view(replayed) == view(stacked)
    assert not (replayed / "gone").exists() and not (replayed / "etc" / "app" / "a.conf").exists()
    assert (replayed / "etc" / "keep.txt").read_text() == "kept"
    assert layer_size(layer).entries == sum(1 for _ in layer.rglob("*"))


def test_a_layer_that_replaces_a_kept_directory_is_not_applicable(scratch):
    lower = scratch / "lower"
    build_lower(lower)
    first = scratch / "first"
    mount_overlay(first, [lower], scratch / "upper", scratch / "work")
    subprocess.run(["rm", "-rf", str(first / "tmp")], check=True)
    (first / "tmp").write_text("a file where /tmp was")
    umount(first)
    replayed = scratch / "replayed"
    mount_overlay(replayed, [lower], scratch / "upper2", scratch / "work2")
    with pytest.raises(LayerNotApplicable, match="/tmp"):
        apply_layer(scratch / "upper", replayed, keep={"tmp"})


def test_layer_size_stops_counting_past_the_limit(tmp_path):
    from corral.storage.layers import LayerSize

    for i in range(50):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_bytes(b"x" * 1000)
    assert layer_size(tmp_path) == LayerSize(entries=100, bytes=sum(
        os.lstat(p).st_size for p in tmp_path.rglob("*")))
    assert layer_size(tmp_path, stop_after=LayerSize(entries=10, bytes=10**9)).entries < 100
