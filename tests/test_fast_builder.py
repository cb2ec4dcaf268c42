"""The template builder's pure parts, without root or runsc: the uploaded files' hash computed again from the
archive the SDK makes (it must equal the SDK's own), the refusal of archives that do not match, glob
sources, and the eviction of the step-layer cache."""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

import pytest
from e2b.template.utils import calculate_files_hash, tar_file_stream

from corral.templates.builder import BuildFailed, _strip_glob, _unpack_verified, evict_layers, files_hash


@pytest.fixture()
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "folder" / "sub").mkdir(parents=True)
    (ctx / "folder" / "a.txt").write_text("A\n")
    (ctx / "folder" / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (ctx / "folder" / "run.sh").write_text("#!/bin/sh\n")
    (ctx / "folder" / "run.sh").chmod(0o755)
    os.symlink("a.txt", ctx / "folder" / "rel")
    os.symlink("/etc/passwd", ctx / "folder" / "abs")
    os.symlink("nowhere", ctx / "folder" / "dangling")
    os.link(ctx / "folder" / "a.txt", ctx / "folder" / "hard.txt")
    (ctx / "top.txt").write_text("top\n")
    return ctx


def _archive(context: Path, src: str, tmp_path: Path, *, gzip: bool = True, resolve: bool = False) -> Path:
    stream = tar_file_stream(src, str(context), [], resolve, gzip)
    path = tmp_path / f"upload-{os.urandom(3).hex()}.tar"
    path.write_bytes(stream.read())
    return path


@pytest.mark.parametrize("src", ["folder", "folder/*", "top.txt", "*.txt", "folder/**/*.bin"])
@pytest.mark.parametrize("gzip", [True, False])
def test_the_files_hash_of_the_archive_is_the_sdks(context, tmp_path, src, gzip):
    expected = calculate_files_hash(src, "dest", str(context), [], False, None)
    with tarfile.open(_archive(context, src, tmp_path, gzip=gzip), "r:*") as tar:
        assert files_hash(tar, src, "dest") == expected


def test_resolved_symlinks_hash_as_the_sdk_hashes_them(tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "real.txt").write_text("real\n")
    os.symlink("real.txt", ctx / "link.txt")
    expected = calculate_files_hash("*", "d", str(ctx), [], True, None)
    with tarfile.open(_archive(ctx, "*", tmp_path, resolve=True), "r:*") as tar:
        assert files_hash(tar, "*", "d") == expected


def test_an_archive_that_does_not_match_its_hash_is_refused_and_not_unpacked(context, tmp_path):
    archive = _archive(context, "folder", tmp_path)
    right = calculate_files_hash("folder", "dest", str(context), [], False, None)
    into = tmp_path / "out"
    with pytest.raises(BuildFailed) as failure:
        _unpack_verified(archive, into, "folder", "dest", "0" * 64)
    assert "do not match its filesHash" in failure.value.message
    assert not into.exists()
    # The right hash for another destination is wrong here too: the hash covers `COPY src dest`.
    with pytest.raises(BuildFailed):
        _unpack_verified(archive, tmp_path / "out2", "folder", "elsewhere", right)
    _unpack_verified(archive, into, "folder", "dest", right)
    assert (into / "folder" / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 10
    assert os.readlink(into / "folder" / "abs") == "/etc/passwd"
    assert os.readlink(into / "folder" / "dangling") == "nowhere"
    assert (into / "folder" / "run.sh").stat().st_mode & 0o777 == 0o755


def test_an_archive_reaching_outside_its_directory_is_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 0
        tar.addfile(info)
    with tarfile.open(archive) as tar:
        digest = files_hash(tar, "x", "y")
    with pytest.raises(BuildFailed):
        _unpack_verified(archive, tmp_path / "into", "x", "y", digest)
    assert not (tmp_path / "escaped.txt").exists()


def test_not_a_tar_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "junk"
    archive.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BuildFailed) as failure:
        _unpack_verified(archive, tmp_path / "into", "x", "y", "0" * 64)
    assert "not a readable tar archive" in failure.value.message


@pytest.mark.parametrize(("src", "directory"), [("folder/*", "folder"), ("*.txt", ""), ("a/b/c.txt", "a/b/c.txt"),
                                                ("a/**/x", "a"), ("./a/./b", "a/b")])
def test_a_glob_source_stands_for_the_directory_before_its_first_wildcard(src, directory):
    assert _strip_glob(src) == directory


def test_the_layer_cache_evicts_the_least_recently_used_unused_layers(tmp_path):
    layers = tmp_path / "build-layers"
    layers.mkdir()
    made = []
    for n in range(4):
        layer = layers / f"l-{n}"
        (layer / "layer").mkdir(parents=True)
        (layer / "layer" / "data").write_bytes(os.urandom(64 * 1024))
        os.utime(layer, (time.time() - 1000 + n, time.time() - 1000 + n))
        (layers / f"key{n}").symlink_to(layer.name)
        made.append(layer)
    in_use = made[0]  # the oldest, but a template stands on it: never a candidate
    freed = evict_layers(layers, 150 * 1024, [p for p in made if p != in_use])
    assert freed > 0
    assert in_use.exists() and made[3].exists()
    assert not made[1].exists() and not made[2].exists()  # oldest first, until under the limit
    assert sorted(p.name for p in layers.iterdir() if p.is_symlink()) == ["key0", "key3"]
