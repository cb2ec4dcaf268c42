"""The volume content API's file operations (storage/volume_files.py) on a plain directory: E2B's
semantics (201/409/404 rules, recursive remove, `/` kept) and confinement: no path, `..` or symlink a
client or a sandbox made leads to a host file outside the volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.storage.volume_files import VolumeFiles, VolumePathError


@pytest.fixture()
def volume(tmp_path: Path) -> VolumeFiles:
    (tmp_path / "volume").mkdir()
    (tmp_path / "secret.txt").write_text("host secret")
    return VolumeFiles(tmp_path / "volume")


def write(files: VolumeFiles, path: str, data: bytes, *, force: bool = False, mode: int | None = None):
    path, parent, fd, temporary = files.begin_write(path, force=force)
    files.write_chunk(fd, data, path)
    return files.commit_write(path, parent, fd, temporary, uid=None, gid=None, mode=mode)


def read(files: VolumeFiles, path: str) -> bytes:
    return b"".join(files.read_chunks(files.open_for_reading(path)))


def refused(status: int, code: str | None = None):
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(VolumePathError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            self.ctx.__exit__(*exc)
            assert self.info.value.status == status, self.info.value.message
            if code:
                assert self.info.value.code == code
            return True
    return Check()


def test_written_file_reads_back_with_its_stat(volume):
    entry = write(volume, "/notes.txt", b"hello")
    assert (entry.name, entry.type, entry.path, entry.size, entry.mode) == ("notes.txt", "file", "/notes.txt", 5, 0o644)
    assert set(entry.to_json()) == {"name", "type", "path", "size", "mode", "uid", "gid", "atime", "mtime", "ctime"}
    assert entry.to_json()["mtime"].endswith("Z")
    assert read(volume, "notes.txt") == b"hello"


def test_writing_an_existing_file_needs_force(volume):
    write(volume, "/a.txt", b"one")
    with refused(409, "conflict") as e:
        write(volume, "/a.txt", b"two")
    assert "force" in e.value.message
    write(volume, "/a.txt", b"two", force=True)
    assert read(volume, "/a.txt") == b"two"


def test_a_refused_write_leaves_no_temporary_file(volume):
    write(volume, "/a.txt", b"one")
    with refused(409):
        write(volume, "/a.txt", b"two")
    assert sorted(os.listdir(volume.root)) == ["a.txt"]


def test_a_file_needs_its_parent_directory(volume):
    with refused(404, "not_found") as e:
        write(volume, "/missing/a.txt", b"x")
    assert "parent" in e.value.message


def test_make_dir_conflicts_unless_forced_and_force_makes_parents(volume):
    made = volume.make_dir("/data", uid=None, gid=None, mode=None, force=False)
    assert (made.type, made.mode) == ("directory", 0o755)
    with refused(409, "conflict"):
        volume.make_dir("/data", uid=None, gid=None, mode=None, force=False)
    assert volume.make_dir("/data", uid=None, gid=None, mode=None, force=True).path == "/data"
    with refused(404):
        volume.make_dir("/x/y/z", uid=None, gid=None, mode=None, force=False)
    assert volume.make_dir("/x/y/z", uid=None, gid=None, mode=0o700, force=True).mode == 0o700
    assert volume.stat("/x/y").type == "directory"


def test_listing_is_one_level_unless_deeper(volume):
    volume.make_dir("/d/e", uid=None, gid=None, mode=None, force=True)
    write(volume, "/d/e/f.txt", b"f")
    write(volume, "/top.txt", b"t")
    assert [e.path for e in volume.list("/")] == ["/d", "/top.txt"]
    assert [e.path for e in volume.list("/", depth=3)] == ["/d", "/d/e", "/d/e/f.txt", "/top.txt"]
    with refused(400, "not_a_directory"):
        volume.list("/top.txt")


def test_remove_is_recursive_and_the_root_stays(volume):
    volume.make_dir("/d/e", uid=None, gid=None, mode=None, force=True)
    write(volume, "/d/e/f.txt", b"f")
    volume.remove("/d")
    assert volume.list("/") == []
    with refused(404):
        volume.remove("/d")
    with refused(404):
        volume.remove("/")
    assert volume.root.is_dir()


def test_update_changes_mode_and_owner(volume):
    write(volume, "/a.txt", b"x")
    changed = volume.update("/a.txt", uid=None, gid=None, mode=0o600)
    assert changed.mode == 0o600
    assert (volume.root / "a.txt").stat().st_mode & 0o777 == 0o600


def test_dot_dot_stays_inside_the_volume(volume):
    with refused(404):
        read(volume, "../secret.txt")
    with refused(404):
        read(volume, "/../../secret.txt")
    write(volume, "../escaped.txt", b"x")
    assert (volume.root / "escaped.txt").exists()
    assert not (volume.root.parent / "escaped.txt").exists()


def test_symlinks_out_of_the_volume_resolve_inside_it(volume):
    outside = volume.root.parent / "secret.txt"
    os.symlink(str(outside), volume.root / "absolute")  # what a sandbox could make
    os.symlink("../secret.txt", volume.root / "relative")
    os.symlink(str(volume.root.parent), volume.root / "updir")
    for path in ("/absolute", "/relative", "/updir/secret.txt"):
        with refused(404):
            read(volume, path)
    with refused(404):
        write(volume, "/updir/planted.txt", b"x")
    assert not (volume.root.parent / "planted.txt").exists()
    with refused(404):
        volume.make_dir("/updir/made", uid=None, gid=None, mode=None, force=False)
    assert not (volume.root.parent / "made").exists()


def test_a_symlink_is_listed_and_removed_as_itself(volume):
    os.symlink("/etc", volume.root / "link")
    entry = volume.stat("/link")
    assert (entry.type, entry.target) == ("symlink", "/etc")
    assert entry.to_json()["target"] == "/etc"
    volume.remove("/link")
    assert not os.path.lexists(volume.root / "link")
    assert Path("/etc").is_dir()


def test_remove_through_a_symlinked_directory_never_leaves_the_volume(volume):
    os.symlink(str(volume.root.parent), volume.root / "updir")
    with refused(404):
        volume.remove("/updir/secret.txt")
    assert (volume.root.parent / "secret.txt").read_text() == "host secret"


def test_paths_with_nul_are_refused(volume):
    with refused(400, "bad_request"):
        volume.stat("/a\0b")
