"""Template bases from OCI registries (corral/templates/images.py): pulls from a real registry on loopback
(Debian's docker-registry, tests/helpers/registry.py) of small images the tests make and push with umoci
and skopeo, with and without credentials, and what is refused: wrong or missing credentials, unknown
images, tampered blobs, other platforms, bad references, plain HTTP registries nobody allowed."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import pytest
from helpers.registry import running_registry

from corral.templates.images import (
    ImageError,
    RegistryCredentials,
    check_image_rootfs,
    default_base_image_maps_to_builtin,
    image_base_layers,
    load_image_config,
    parse_reference,
    pull_image,
)

INSECURE = ("127.0.0.1:*",)
USER, PASSWORD = "alice", "correct-horse-battery-staple"


def make_rootfs(root: Path) -> tuple[Path, Path]:
    """A tiny first layer (a few files, a symlink, a file owned by 1234:5678) and a second layer that adds
    /etc/added; the image deletes /etc/doomed in that second layer."""
    first, second = root / "first", root / "second"
    (first / "etc").mkdir(parents=True)
    (first / "bin").mkdir()
    (first / "etc/greeting").write_text("hello\n")
    (first / "etc/doomed").write_text("deleted by the second layer\n")
    (first / "etc/owned").write_text("owned\n")
    os.chown(first / "etc/owned", 1234, 5678)
    (first / "bin/link").symlink_to("/etc/greeting")
    (second / "etc").mkdir(parents=True)
    (second / "etc/added").write_text("added by the second layer\n")
    return first, second


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    return make_rootfs(tmp_path_factory.mktemp("layers"))


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory, layers):
    with running_registry(tmp_path_factory.mktemp("open-registry")) as registry:
        registry.image = registry.push_rootfs(layers[0], "corral/small:1", second_layer=layers[1],
                                              deleted=["/etc/doomed"])
        yield registry


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory, layers):
    with running_registry(tmp_path_factory.mktemp("private-registry"), users={USER: PASSWORD}) as registry:
        registry.image = registry.push_rootfs(layers[0], "team/private:1", second_layer=layers[1],
                                              deleted=["/etc/doomed"], credentials=(USER, PASSWORD))
        yield registry


def pull(reference: str, cache: Path, *, credentials: RegistryCredentials | None = None,
         insecure: tuple[str, ...] = INSECURE, log: list[str] | None = None) -> Path:
    lines = [] if log is None else log
    return asyncio.run(pull_image(reference, credentials=credentials, cache_dir=cache, log=lines.append,
                                  insecure_registries=insecure))


def pull_error(reference: str, cache: Path, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as caught:
        pull(reference, cache, **kwargs)
    return caught.value


def cache_entries(cache: Path) -> list[str]:
    """What a pull left under images/, besides its lock files."""
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if p.name != "locks") if images.exists() else []


# ---------------------------------------------------------------- pulls


def test_pull_unpacks_both_layers_into_one_directory_with_the_whiteout_applied(open_registry, tmp_path):
    rootfs = pull(open_registry.image.reference, tmp_path)
    assert (rootfs / "etc/greeting").read_text() == "hello\n"
    assert (rootfs / "etc/added").read_text() == "added by the second layer\n"
    assert not (rootfs / "etc/doomed").exists()
    assert not list(rootfs.rglob(".wh.*"))


def test_pull_keeps_ownership_and_symlinks(open_registry, tmp_path):
    rootfs = pull(open_registry.image.reference, tmp_path)
    owned = (rootfs / "etc/owned").stat()
    assert (owned.st_uid, owned.st_gid) == (1234, 5678)
    assert os.readlink(rootfs / "bin/link") == "/etc/greeting"


def test_pull_keys_the_cache_by_manifest_digest(open_registry, tmp_path):
    rootfs = pull(open_registry.image.reference, tmp_path)
    assert rootfs == tmp_path / "images" / open_registry.image.digest.replace(":", "-") / "rootfs"
    assert load_image_config(rootfs)["Cmd"] == ["/bin/sh"]


def test_pull_with_credentials(private_registry, tmp_path):
    rootfs = pull(private_registry.image.reference, tmp_path, credentials=RegistryCredentials(USER, PASSWORD))
    assert (rootfs / "etc/added").exists() and not (rootfs / "etc/doomed").exists()


def test_concurrent_pulls_of_one_image_pull_it_once(open_registry, tmp_path):
    logs: list[list[str]] = [[], [], []]

    async def both():
        return await asyncio.gather(*(
            pull_image(open_registry.image.reference, credentials=None, cache_dir=tmp_path, log=log.append,
                       insecure_registries=INSECURE) for log in logs))

    paths = asyncio.run(both())
    assert len(set(paths)) == 1 and (paths[0] / "etc/added").exists()
    assert sum(1 for log in logs for line in log if line.startswith("pulling ")) == 1
    assert cache_entries(tmp_path) == sorted([paths[0].parent.name, "refs"])


def test_pull_of_a_multi_platform_image_takes_its_linux_amd64_variant(open_registry, layers, tmp_path):
    arm = open_registry.push_rootfs(layers[1], "corral/arm-variant:1", architecture="arm64")
    index = open_registry.push_index("corral/multi:1", {"linux/arm64": arm, "linux/amd64": open_registry.image})
    rootfs = pull(index.reference, tmp_path)
    assert rootfs.parent.name == open_registry.image.digest.replace(":", "-")
    assert (rootfs / "etc/greeting").exists()


# ---------------------------------------------------------------- refused


def test_wrong_credentials_are_refused_with_a_clear_message_and_leave_nothing(private_registry, tmp_path):
    error = pull_error(private_registry.image.reference, tmp_path, credentials=RegistryCredentials(USER, "wrong"))
    assert error.status == 400
    assert "refused the credentials" in str(error) and private_registry.address in str(error)
    assert cache_entries(tmp_path) == []


def test_private_image_without_credentials_says_credentials_are_needed(private_registry, tmp_path):
    error = pull_error(private_registry.image.reference, tmp_path)
    assert error.status == 400
    assert "requires credentials" in str(error)


def test_unknown_tag_is_not_found(open_registry, tmp_path):
    error = pull_error(open_registry.reference("corral/small:no-such-tag"), tmp_path)
    assert error.status == 400
    assert "not found" in str(error) and "corral/small:no-such-tag" in str(error)


def test_unknown_repository_is_not_found(open_registry, tmp_path):
    error = pull_error(open_registry.reference("nobody/nothing:1"), tmp_path)
    assert error.status == 400
    assert "not found" in str(error) and "nobody/nothing" in str(error)


@pytest.mark.parametrize("reference", [
    "", "UPPER/case:1", "python:3.11:extra", "python@sha256:abc", "python:-bad", "a//b", " python",
    "registry.example:port/x"])
def test_bad_reference_syntax_is_a_400_naming_the_reference(reference, tmp_path):
    error = pull_error(reference, tmp_path)
    assert error.status == 400
    assert "invalid image reference" in str(error) and repr(reference) in str(error)
    assert cache_entries(tmp_path) == []


def test_tampered_layer_blob_is_refused_with_a_digest_error(tmp_path, layers):
    with running_registry(tmp_path / "registry") as registry:
        image = registry.push_rootfs(layers[0], "corral/tampered:1")
        layer = registry.manifest(image)["layers"][0]["digest"]
        data = registry.blob_data(layer)
        original = data.read_bytes()
        data.write_bytes(bytes(b ^ 0xFF for b in original))  # same size, other content
        error = pull_error(image.reference, tmp_path / "cache")
    assert error.status == 502
    assert "digest" in str(error) and "refused" in str(error)
    assert cache_entries(tmp_path / "cache") == []


def test_image_for_another_architecture_is_refused(open_registry, layers, tmp_path):
    image = open_registry.push_rootfs(layers[0], "corral/arm:1", architecture="arm64")
    error = pull_error(image.reference, tmp_path)
    assert error.status == 400
    assert "linux/arm64" in str(error) and "linux/amd64 images only" in str(error)
    assert cache_entries(tmp_path) == []


def test_multi_platform_image_without_linux_amd64_is_refused_naming_what_it_offers(open_registry, layers, tmp_path):
    arm = open_registry.push_rootfs(layers[1], "corral/arm-only-variant:1", architecture="arm64")
    index = open_registry.push_index("corral/arm-only:1", {"linux/arm64": arm})
    error = pull_error(index.reference, tmp_path)
    assert error.status == 400
    assert "no linux/amd64 variant" in str(error) and "linux/arm64" in str(error)
    assert cache_entries(tmp_path) == []


def test_plain_http_registry_not_listed_as_insecure_is_refused(open_registry, tmp_path):
    error = pull_error(open_registry.image.reference, tmp_path, insecure=())
    assert error.status == 502
    assert "plain HTTP" in str(error) and "insecure_registries" in str(error)


def test_unreachable_registry_fails_fast_with_502(tmp_path):
    started = time.monotonic()
    error = pull_error("127.0.0.1:1/corral/small:1", tmp_path)
    assert error.status == 502
    assert "cannot be reached" in str(error) and "127.0.0.1:1" in str(error)
    assert time.monotonic() - started < 40  # the bound the resolve timeout promises (30 s)


# ---------------------------------------------------------------- cache


def test_tag_pulled_before_is_reused_while_the_registry_is_down(tmp_path, layers):
    with running_registry(tmp_path / "registry") as registry:
        image = registry.push_rootfs(layers[0], "corral/offline:1")
        first = pull(image.reference, tmp_path / "cache")
    log: list[str] = []
    again = pull(image.reference, tmp_path / "cache", log=log)
    assert again == first
    assert any("cannot be reached" in line and "resolved to before" in line for line in log)


def test_reference_by_digest_pulled_before_needs_no_registry(tmp_path, layers):
    with running_registry(tmp_path / "registry") as registry:
        image = registry.push_rootfs(layers[0], "corral/pinned:1")
        first = pull(image.by_digest, tmp_path / "cache")
    log: list[str] = []
    assert pull(image.by_digest, tmp_path / "cache", log=log) == first
    assert log == [f"using cached image {image.by_digest} ({image.digest})"]


def test_private_image_is_not_reused_while_the_registry_is_down(tmp_path, layers):
    credentials = RegistryCredentials(USER, PASSWORD)
    with running_registry(tmp_path / "registry", users={USER: PASSWORD}) as registry:
        image = registry.push_rootfs(layers[0], "team/pinned:1", credentials=(USER, PASSWORD))
        pull(image.by_digest, tmp_path / "cache", credentials=credentials)
    for reference in (image.by_digest, image.reference):
        assert pull_error(reference, tmp_path / "cache").status == 502


def test_credentials_appear_in_no_log_line_error_or_file(private_registry, tmp_path):
    secrets = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    log: list[str] = []
    pull(private_registry.image.reference, tmp_path, credentials=RegistryCredentials(USER, PASSWORD), log=log)
    wrong = RegistryCredentials(USER, PASSWORD + "-wrong")
    error = pull_error(private_registry.image.reference, tmp_path / "again", credentials=wrong, log=log)
    assert log and not any(s in line for s in (*secrets, wrong.password) for line in log)
    assert not any(s in str(error) for s in (*secrets, wrong.password))
    assert PASSWORD not in repr(RegistryCredentials(USER, PASSWORD))
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert not any(s.encode() in path.read_bytes() for s in secrets), path


# ---------------------------------------------------------------- names and what a base needs


@pytest.mark.parametrize(("reference", "normalised"), [
    ("python:3.11", "docker.io/library/python:3.11"),
    ("e2bdev/base", "docker.io/e2bdev/base:latest"),
    ("index.docker.io/library/debian:bookworm", "docker.io/library/debian:bookworm"),
    ("localhost:5000/team/app", "localhost:5000/team/app:latest"),
    ("ghcr.io/org/tool:v1@sha256:" + "a" * 64, "ghcr.io/org/tool:v1@sha256:" + "a" * 64),
])
def test_references_normalise_as_docker_does(reference, normalised):
    assert str(parse_reference(reference)) == normalised


@pytest.mark.parametrize(("reference", "builtin"), [
    ("e2bdev/base", "base"), ("e2bdev/base:latest", "base"), ("docker.io/e2bdev/base:0.1", "base"),
    ("python:3.11", None), ("ghcr.io/e2bdev/base", None), ("not a reference", None)])
def test_e2b_default_base_image_maps_to_the_builtin_base(reference, builtin):
    assert default_base_image_maps_to_builtin(reference) == builtin


def fake_rootfs(root: Path, *, python: str | None = "python3.11", glibc: str | None = "2.36") -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin/sh").write_bytes(b"\x7fELF")
    if python:
        (root / "usr/bin" / python).write_bytes(b"\x7fELF")
        (root / "usr/bin/python3").symlink_to(python)
    if glibc:
        (root / "lib/x86_64-linux-gnu").mkdir(parents=True)
        (root / "lib/x86_64-linux-gnu/libc.so.6").write_bytes(
            f"GNU C Library (Debian GLIBC {glibc}-9) stable release version {glibc}.\n".encode())
    return root


def test_debian_bookworm_like_rootfs_is_a_usable_base(tmp_path):
    check_image_rootfs(fake_rootfs(tmp_path))


def test_rootfs_without_usr_bin_python3_is_refused_naming_it(tmp_path):
    with pytest.raises(ImageError) as caught:
        check_image_rootfs(fake_rootfs(tmp_path, python=None))
    assert caught.value.status == 400 and "/usr/bin/python3" in str(caught.value)


def test_rootfs_with_python_only_in_usr_local_is_refused_naming_where_it_is(tmp_path):
    root = fake_rootfs(tmp_path, python=None)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/python3.11").write_bytes(b"\x7fELF")
    (root / "usr/local/bin/python3").symlink_to("python3.11")
    with pytest.raises(ImageError) as caught:
        check_image_rootfs(root)
    assert "/usr/bin/python3" in str(caught.value) and "/usr/local/bin/python3" in str(caught.value)


def test_rootfs_with_python_311_only_in_usr_local_gets_a_layer_linking_usr_bin_python3_there(tmp_path):
    root = fake_rootfs(tmp_path / "rootfs", python=None)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/python3.11").write_bytes(b"\x7fELF")
    log: list[str] = []
    layers = image_base_layers(root, log.append)
    assert layers == (tmp_path / "python3-link", root)
    assert os.readlink(layers[0] / "usr/bin/python3") == "/usr/local/bin/python3.11"
    assert sorted(str(p.relative_to(layers[0])) for p in layers[0].rglob("*")) == ["usr", "usr/bin",
                                                                                  "usr/bin/python3"]
    assert any("/usr/local/bin/python3.11" in line for line in log)
    assert image_base_layers(root, log.append) == layers  # made once, then reused


def test_rootfs_with_another_python_only_in_usr_local_is_refused_without_a_link(tmp_path):
    root = fake_rootfs(tmp_path / "rootfs", python=None)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/python3.12").write_bytes(b"\x7fELF")
    (root / "usr/local/bin/python3").symlink_to("python3.12")
    with pytest.raises(ImageError) as caught:
        image_base_layers(root, lambda _: None)
    assert "/usr/local/bin/python3 (3.12)" in str(caught.value)
    assert not (tmp_path / "python3-link").exists()


def test_rootfs_with_another_python_version_is_refused_naming_it(tmp_path):
    with pytest.raises(ImageError) as caught:
        check_image_rootfs(fake_rootfs(tmp_path, python="python3.12"))
    assert "Python 3.11" in str(caught.value) and "it is 3.12" in str(caught.value)


def test_musl_rootfs_is_refused_naming_glibc(tmp_path):
    with pytest.raises(ImageError) as caught:
        check_image_rootfs(fake_rootfs(tmp_path, glibc=None))
    assert "glibc" in str(caught.value)
