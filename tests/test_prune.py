"""`corral template prune`: unused template builds go, anything something stands on stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from corral.templates.prune import in_use, mounted_lower_dirs, remove, unused_builds

OLD = time.time() - 7200  # builds older than the one-hour grace period


def build(path: Path, *, lowers: list[Path] | None = None, size: int = 4096) -> Path:
    path.mkdir(parents=True)
    (path / "data").write_bytes(b"x" * size)
    if lowers is not None:
        (path / "checkpoint.json").write_text(json.dumps({"lowers": [str(p) for p in lowers]}))
    os.utime(path, (OLD, OLD))
    return path


def make_cache(root: Path) -> dict[str, Path]:
    cache = root / "cache"
    p = {
        "rootfs_old": build(cache / "rootfs" / "r-old"),
        "rootfs_new": build(cache / "rootfs" / "r-new"),
        "rootfs_paused": build(cache / "rootfs" / "r-paused"),
        "rootfs_mounted": build(cache / "rootfs" / "r-mounted"),
        "envd_old": build(cache / "envd" / "e-old"),
        "envd_new": build(cache / "envd" / "e-new"),
    }
    (cache / "rootfs" / "r-old.log").write_text("build log")
    failed = cache / "rootfs" / "r-failed.log"  # a failed build leaves only its log
    failed.write_text("debootstrap failed")
    os.utime(failed, (OLD, OLD))
    p["failed_log"] = failed
    base = cache / "templates" / "base"
    p["etc_new"] = build(base / "s-new.etc")
    p["snap_new"] = build(base / "s-new", lowers=[base / "s-new.etc", p["envd_new"], p["rootfs_new"]])
    p["etc_old"] = build(base / "s-old.etc")
    p["snap_old"] = build(base / "s-old", lowers=[base / "s-old.etc", p["envd_old"], p["rootfs_old"]])
    p["etc_paused"] = build(base / "s-paused.etc")
    p["snap_paused"] = build(base / "s-paused", lowers=[base / "s-paused.etc", p["rootfs_paused"]])
    (base / "current").symlink_to("s-new")
    p["partial"] = build(cache / "rootfs" / ".r-building.partial")
    p["recent"] = build(cache / "rootfs" / "r-recent")
    os.utime(p["recent"])  # just built: within the grace period
    p["cache"] = cache
    return p


def test_only_builds_nothing_uses_are_removed(tmp_path):
    p = make_cache(tmp_path)
    data = tmp_path / "data"
    # A paused sandbox's checkpoint stands on an old snapshot's layer (and so on its lowers).
    node = data / "checkpoints" / "n1"
    node.mkdir(parents=True)
    (node / "checkpoint.json").write_text(json.dumps({"lowers": [str(p["snap_paused"] / "layer"),
                                                                 str(p["etc_paused"]), str(p["rootfs_paused"])]}))
    mounted = {p["rootfs_mounted"]}  # a running sandbox of another instance
    unused = {e.path for e in unused_builds(p["cache"], [data], mounted=mounted)}
    assert unused == {p["rootfs_old"], p["envd_old"], p["snap_old"], p["etc_old"]}
    # Without the data directory the paused sandbox's builds would look unused: each data dir must be named.
    assert p["snap_paused"] in {e.path for e in unused_builds(p["cache"], [], mounted=mounted)}

    entries = unused_builds(p["cache"], [data], mounted=mounted)
    freed = remove(entries)
    assert freed == sum(e.size_bytes for e in entries) > 0
    assert not any(path.exists() for path in unused)
    assert not (p["cache"] / "rootfs" / "r-old.log").exists()
    for kept in ("rootfs_new", "envd_new", "snap_new", "etc_new", "snap_paused", "etc_paused", "rootfs_paused",
                 "rootfs_mounted", "partial", "recent"):
        assert p[kept].exists(), kept
    assert (p["cache"] / "templates" / "base" / "current").resolve() == p["snap_new"]
    assert unused_builds(p["cache"], [data], mounted=mounted) == []


def test_mounted_overlays_count_as_in_use(tmp_path):
    lower = tmp_path / "cache" / "rootfs" / "r-live"
    (lower / "etc").mkdir(parents=True)
    merged, upper, work = tmp_path / "merged", tmp_path / "upper", tmp_path / "work"
    for d in (merged, upper, work):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        assert lower in mounted_lower_dirs()
        assert lower.resolve() in in_use(tmp_path / "cache", [])
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert lower not in mounted_lower_dirs()


def test_cli_dry_run_removes_nothing(tmp_path):
    p = make_cache(tmp_path)
    env = {**os.environ, "CORRAL_CACHE_DIR": str(p["cache"]), "CORRAL_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-c", "from corral.cli.main import app; app()", "template", "prune",
                          "--dry-run", "--json"], env=env, capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report["dryRun"] is True and report["removed"] == []
    assert str(p["rootfs_old"]) in report["unused"] and report["bytes"] > 0
    assert p["rootfs_old"].exists()
    out = subprocess.run([sys.executable, "-c", "from corral.cli.main import app; app()", "template", "prune",
                          "--json"], env=env, capture_output=True, text=True, check=True).stdout
    removed = json.loads(out)["removed"]
    assert str(p["rootfs_old"]) in removed and not p["rootfs_old"].exists()
    assert str(p["failed_log"]) in removed and not p["failed_log"].exists()
    assert p["rootfs_new"].exists() and (p["cache"] / "rootfs" / "r-new").is_dir()
