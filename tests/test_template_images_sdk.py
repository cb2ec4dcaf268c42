"""Templates from OCI images with the unmodified SDK (`Template().from_image(...)`): images of a Debian
bookworm root filesystem with python3 (the cached root filesystem of Corral's `base`) pushed to real
registries on loopback (Debian's docker-registry, tests/helpers/registry.py), with and without credentials;
what is refused (wrong password, unknown image, tampered blob); an image with its Python only in
/usr/local, as Docker Hub's python images have it; and E2B's default base image standing for `base`."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import BuildException, Sandbox, Template, wait_for_port

from corral.templates.builtin import BASE
from tests.helpers.registry import running_registry
from tests.helpers.server import ServerProcess, free_port

INSTANCE, NETWORK = "t15", "10.235.0.0/22"
USER, PASSWORD = "builder", "correct-horse-battery-staple"
WRONG_PASSWORD = "wrong-horse-battery-staple"
CACHE = Path("/var/cache/corral")


def layer_tar(path: Path, *, files: dict[str, str] = {}, symlinks: dict[str, str] = {},  # noqa: B006
              whiteouts: tuple[str, ...] = ()) -> Path:
    """An uncompressed layer archive: files with their text, symlinks, and whiteouts deleting paths of the
    layers below (`.wh.<name>` beside them, as the OCI image spec has it)."""
    with tarfile.open(path, "w") as tar:
        for name, text in files.items():
            data = text.encode()
            tar.addfile(_entry(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        for name, target in symlinks.items():
            entry = _entry(name, tarfile.SYMTYPE, 0o777)
            entry.linkname = target
            tar.addfile(entry)
        for name in whiteouts:
            parent, _, base = name.rpartition("/")
            tar.addfile(_entry(f"{parent}/.wh.{base}", tarfile.REGTYPE, 0o644), io.BytesIO(b""))
    return path


def _entry(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type, entry.mode, entry.size, entry.uid, entry.gid = kind, mode, size, 0, 0
    return entry


@pytest.fixture(scope="module")
def module_start(tmp_path_factory) -> Path:
    """A file made as the module starts: what the server writes to the shared template cache is newer."""
    marker = tmp_path_factory.mktemp("since") / "start"
    marker.touch()
    return marker


@pytest.fixture(scope="module")
def images(runtime, tmp_path_factory):
    """The registries and the images the tests build from. The base template's root filesystem is pushed
    once; the other images reuse its layer and add a small one of their own."""
    rootfs = CACHE / "rootfs" / BASE.rootfs_key()  # the `runtime` fixture has built `base`
    root = tmp_path_factory.mktemp("registries")
    with running_registry(root / "open") as open_registry, \
            running_registry(root / "private", users={USER: PASSWORD}) as private_registry:
        bookworm = open_registry.push_rootfs(rootfs, "corral/bookworm:1")
        # Docker Hub's python images: Python in /usr/local/bin, no /usr/bin/python3.
        usr_local = open_registry.copy_image(bookworm, "corral/bookworm:usr-local-python", add_layer=layer_tar(
            root / "usr-local.tar", symlinks={"usr/local/bin/python3.11": "/usr/bin/python3.11"},
            whiteouts=("usr/bin/python3",)))
        private = private_registry.copy_image(bookworm, "team/bookworm:1", credentials=(USER, PASSWORD),
                                              add_layer=layer_tar(root / "private.tar", files={
                                                  "etc/corral-private": "pulled with credentials\n"}))
        yield SimpleNamespace(open=open_registry, private=private_registry, bookworm=bookworm,
                              usr_local=usr_local, private_image=private)
        addresses = (open_registry.address, private_registry.address)
    _remove_pulled_images(addresses)


def _remove_pulled_images(addresses: tuple[str, ...]) -> None:
    """The cache entries of the images pulled from this run's registries (each run pushes new digests)."""
    pulled = CACHE / "images"
    for meta in pulled.glob("*/image.json"):
        if json.loads(meta.read_text()).get("reference", "").startswith(addresses):
            shutil.rmtree(meta.parent, ignore_errors=True)
            (pulled / "locks" / f"{meta.parent.name}.lock").unlink(missing_ok=True)
    for record in pulled.glob("refs/*.json"):
        if json.loads(record.read_text()).get("reference", "").startswith(addresses):
            record.unlink()


@pytest.fixture(scope="module")
def server(harness, runtime, store, images, module_start):
    # HTTPS through a proxy nobody listens on: a pull of E2B's default base from Docker Hub fails at once
    # instead of reaching the internet (the loopback registries are never proxied).
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=0,
                         extra_env={"CORRAL_INSECURE_REGISTRIES": "127.0.0.1:*",
                                    "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}"})
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def opts(server):
    key = server.cli("keys", "create", "--name", "template-images").strip()
    yield {"api_url": server.url, "sandbox_url": server.url, "api_key": key}
    # The templates stand on the pulled images, which the images fixture removes.
    headers = {"X-API-Key": key}
    for template in httpx.get(f"{server.url}/templates", headers=headers).json():
        httpx.delete(f"{server.url}/templates/{template['templateID']}", headers=headers)


def _build(opts, template, name, **kwargs):
    lines: list = []
    info = Template.build(template, name, on_build_logs=lines.append, **opts, **kwargs)
    return info, [entry.message for entry in lines]


def _build_error(opts, template, name) -> str:
    with pytest.raises(BuildException) as failure:
        _build(opts, template, name)
    return str(failure.value)


def test_from_image_runs_steps_and_its_start_command_as_user_in_home(opts, images):
    template = (Template().from_image(images.bookworm.reference)
                .run_cmd("echo built from an image > marker.txt")
                .set_start_cmd("python3 -m http.server 8125 --directory /home/user", wait_for_port(8125)))
    _, logs = _build(opts, template, "from-image")
    assert any(f"FROM image {images.bookworm.reference}" in line for line in logs), logs[:20]
    sandbox = Sandbox.create("from-image", **opts)
    try:
        run = sandbox.commands.run
        assert run("cat /home/user/marker.txt").stdout == "built from an image\n"
        assert run("whoami && pwd").stdout == "user\n/home/user\n"
        # The image already has `user`: the build used it instead of adding another.
        assert run("grep -c '^user:' /etc/passwd && stat -c %U /home/user/marker.txt").stdout == "1\nuser\n"
        assert run("sudo -n id -u").stdout == "0\n"
        assert "marker.txt" in run("curl -s http://127.0.0.1:8125/").stdout
    finally:
        sandbox.kill()


def test_from_image_with_credentials_pulls_from_a_private_registry(opts, images):
    template = (Template().from_image(images.private_image.reference, username=USER, password=PASSWORD)
                .run_cmd("cat /etc/corral-private"))
    _, logs = _build(opts, template, "from-private-image")
    assert "pulled with credentials" in logs, logs


def test_wrong_registry_password_fails_clearly_and_no_credentials_are_kept(opts, images, server, module_start):
    template = Template().from_image(images.private_image.reference, username=USER, password=WRONG_PASSWORD)
    message = _build_error(opts, template, "wrong-password")
    assert f"registry {images.private.address} refused the credentials" in message, message
    secrets = [p.encode() for p in (PASSWORD, WRONG_PASSWORD)]
    secrets += [base64.b64encode(f"{USER}:{p}".encode()) for p in (PASSWORD, WRONG_PASSWORD)]
    assert WRONG_PASSWORD not in message
    # Every file the server has: its database, build logs, own log and snapshots (the previous test's build
    # used the right one), and what it wrote to the shared template cache since the module started (pulled
    # images, build layers; -cnewer: unpacked files keep their image's times, not their change time). GNU
    # grep searches for all the strings in one pass over the gigabytes (Python took ~50 s).
    patterns = TEST_ROOT / f"{INSTANCE}-secrets.txt"
    patterns.write_bytes(b"\n".join(secrets) + b"\n")
    try:
        # (Files another test run's build removes meanwhile may vanish between find and grep.)
        written = subprocess.run(["find", str(TEST_ROOT / INSTANCE), str(CACHE), "-xdev", "-cnewer",
                                  str(module_start), "-type", "f", "-print0"], capture_output=True).stdout
        assert len(written.split(b"\0")) > 10  # the server's own files at least
        found = subprocess.run(["xargs", "-0", "-r", "grep", "-laF", "-D", "skip", "-f", str(patterns)],
                               input=written, capture_output=True)
    finally:
        patterns.unlink()
    unread = [line for line in found.stderr.splitlines() if not line.endswith(b"No such file or directory")]
    assert found.stdout == b"" and unread == [], (found.stdout, unread)


def test_unknown_image_fails_the_build_naming_it(opts, images):
    reference = images.open.reference("corral/no-such-image:1")
    message = _build_error(opts, Template().from_image(reference).run_cmd("true"), "unknown-image")
    assert f"image {reference} not found in registry {images.open.address}" in message, message


def test_tampered_blob_fails_the_build_naming_the_digest(opts, images, tmp_path):
    (tmp_path / "rootfs/etc").mkdir(parents=True)
    (tmp_path / "rootfs/etc/hello").write_text("hello\n")
    image = images.open.push_rootfs(tmp_path / "rootfs", "corral/tampered:1")
    blob = images.open.blob_data(images.open.manifest(image)["layers"][0]["digest"])
    blob.write_bytes(bytes(b ^ 0xFF for b in blob.read_bytes()))  # same size, other content
    message = _build_error(opts, Template().from_image(image.reference).run_cmd("true"), "tampered")
    assert "does not match its digest; refused" in message, message


def test_image_with_python_only_in_usr_local_gets_usr_bin_python3_linked_there(opts, images):
    template = Template().from_image(images.usr_local.reference).run_cmd("readlink /usr/bin/python3")
    _, logs = _build(opts, template, "usr-local-python")
    assert any("linking it to /usr/local/bin/python3.11" in line for line in logs), logs[:20]
    assert "/usr/local/bin/python3.11" in logs
    sandbox = Sandbox.create("usr-local-python", **opts)
    try:
        run = sandbox.commands.run
        assert run("readlink /usr/bin/python3").stdout == "/usr/local/bin/python3.11\n"
        assert run("python3 -c 'import sys; print(sys.version_info[:2])'").stdout == "(3, 11)\n"
    finally:
        sandbox.kill()


def test_default_base_image_builds_from_corrals_base(opts):
    # Template() without a from_* sends the same fromImage (e2bdev/base) as from_base_image().
    template = Template().from_base_image().run_cmd("cat /etc/debian_version")
    _, logs = _build(opts, template, "default-base")
    assert any("e2bdev/base cannot be used" in line
               and "using Corral's built-in template 'base' instead" in line for line in logs), logs[:20]
    sandbox = Sandbox.create("default-base", **opts)
    try:
        assert sandbox.commands.run("whoami && pwd").stdout == "user\n/home/user\n"
    finally:
        sandbox.kill()
