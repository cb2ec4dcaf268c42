"""The `base` template as E2B's base image, through the unmodified `e2b` Python SDK: sudo (and apt through
it), `python`/`pip`, and files as E2B's envd writes them (missing parents, browser uploads, metadata)."""

from __future__ import annotations

import email.utils
import hashlib
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from e2b import CommandExitException
from helpers.testnet import TestHost

from tests.helpers.envd_client import envd_sandbox, sync_client

# TEST-NET-2: not a private range, so the sandbox reaches it through its internet egress, as a mirror.
APT_HOST_ADDRESS = "198.51.100.7"
APT_PORT = 8080
APT_PACKAGE = "corral-hello"


@pytest.fixture(scope="module")
def envd(harness, runtime):
    with envd_sandbox(harness, runtime, defaultUser="user", defaultWorkdir="/home/user") as sandbox:
        yield sandbox


@pytest.fixture
def sbx(envd):
    return sync_client(envd.url, envd.token, envd.sandbox_id)


# --- sudo ------------------------------------------------------------------------------------------


def test_sudo_runs_a_command_as_root_without_a_password(sbx):
    result = sbx.commands.run("sudo id -u")
    assert result.stdout == "0\n"


def test_sudo_passes_standard_streams_and_the_working_directory(sbx):
    result = sbx.commands.run("cd /tmp && echo secret | sudo tee sudo-wrote >/dev/null && "
                              "stat -c %U:%a /tmp/sudo-wrote && sudo pwd && sudo cat /tmp/sudo-wrote")
    assert result.stdout == "root:644\n/tmp\nsecret\n"


def test_sudo_reports_the_commands_exit_status(sbx):
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("sudo sh -c 'echo out; echo err >&2; exit 7'")
    assert (info.value.exit_code, info.value.stdout, info.value.stderr) == (7, "out\n", "err\n")


def test_sudo_is_refused_to_a_user_without_sudo_rights(sbx):
    name = "nosudo" + secrets.token_hex(2)
    sbx.commands.run(f"useradd --create-home {name}", user="root")
    try:
        with pytest.raises(CommandExitException) as info:
            sbx.commands.run("sudo id -u", user=name)
        assert info.value.exit_code == 1
        assert info.value.stdout == ""
        assert f"{name} may not run commands as root without a password" in info.value.stderr
    finally:
        sbx.commands.run(f"userdel --remove {name}", user="root")


def test_killing_a_sudo_command_stops_what_sudo_runs(sbx):
    marker = secrets.randbelow(10_000) + 300
    handle = sbx.commands.run(f"sudo sleep {marker}", background=True)
    running = f"pgrep -u root -x sleep -a | grep -c ' {marker}$' || true"
    _wait_for(lambda: sbx.commands.run(running).stdout == "1\n")
    assert sbx.commands.kill(handle.pid) is True
    _wait_for(lambda: sbx.commands.run(running).stdout == "0\n", timeout=15)


@pytest.fixture(scope="module")
def apt_repository(tmp_path_factory):
    """A flat apt repository with one package, served by a test host (the sandbox's internet egress
    reaches it as it would reach a Debian mirror)."""
    root = tmp_path_factory.mktemp("apt")
    _build_repository(root / "repo")
    host = TestHost("apt", APT_HOST_ADDRESS).up()
    host.serve_files(APT_PORT, root / "repo")
    yield f"http://{APT_HOST_ADDRESS}:{APT_PORT}/"
    host.down()


def test_sudo_apt_get_installs_a_package_through_the_sandboxs_egress(sbx, apt_repository):
    # Only the test's repository: the template's Debian source would send traffic to the internet.
    sbx.commands.run(f"mv /etc/apt/sources.list /root/sources.list.orig && "
                     f"echo 'deb [trusted=yes] {apt_repository} ./' > /etc/apt/sources.list.d/local.list",
                     user="root")
    try:
        sbx.commands.run(f"sudo apt-get update -q && sudo apt-get install -y -q {APT_PACKAGE}", timeout=300)
        assert sbx.commands.run(APT_PACKAGE).stdout == "hello from a local apt repository\n"
        assert sbx.commands.run(f"dpkg-query -W -f '${{Status}}' {APT_PACKAGE}").stdout == \
            "install ok installed"
    finally:
        sbx.commands.run("rm -f /etc/apt/sources.list.d/local.list && "
                         "mv /root/sources.list.orig /etc/apt/sources.list", user="root")


def _build_repository(repo: Path) -> None:
    """One `Architecture: all` package built with dpkg-deb, indexed by hand (Packages and Release are a
    few lines each; no dpkg-dev or apt-utils needed)."""
    package = repo.parent / "package"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "usr/bin").mkdir(parents=True)
    (package / "DEBIAN/control").write_text(
        f"Package: {APT_PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: Corral tests <tests@example.invalid>\n"
        "Description: prints a greeting\n A package served by Corral's tests from a local repository.\n")
    program = package / "usr/bin" / APT_PACKAGE
    program.write_text("#!/bin/sh\necho 'hello from a local apt repository'\n")
    program.chmod(0o755)
    repo.mkdir()
    deb = repo / f"{APT_PACKAGE}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(package), str(deb)], check=True,
                   capture_output=True)
    data = deb.read_bytes()
    control = subprocess.run(["dpkg-deb", "--field", str(deb)], check=True, capture_output=True,
                             text=True).stdout
    stanza = (control.rstrip("\n") + f"\nFilename: ./{deb.name}\nSize: {len(data)}\n"
              f"MD5sum: {hashlib.md5(data).hexdigest()}\nSHA256: {hashlib.sha256(data).hexdigest()}\n\n")
    (repo / "Packages").write_text(stanza)
    index = stanza.encode()
    (repo / "Release").write_text(
        f"Date: {email.utils.formatdate(usegmt=True)}\n"
        f"MD5Sum:\n {hashlib.md5(index).hexdigest()} {len(index)} Packages\n"
        f"SHA256:\n {hashlib.sha256(index).hexdigest()} {len(index)} Packages\n")


# --- python ----------------------------------------------------------------------------------------


def test_python_and_pip_are_python_3(sbx):
    result = sbx.commands.run("python --version && pip --version")
    python, pip = result.stdout.splitlines()
    assert python.startswith("Python 3.")
    assert pip.startswith("pip ") and pip.endswith(f"(python {python.split()[1].rsplit('.', 1)[0]})")


# --- files -----------------------------------------------------------------------------------------


def test_write_creates_missing_parents_even_under_root_owned_directories(sbx):
    directory = f"/{secrets.randbelow(1000)}"
    info = sbx.files.write(f"{directory}/x.txt", "made for user")
    assert info.path == f"{directory}/x.txt"
    assert sbx.files.read(f"{directory}/x.txt") == "made for user"
    created = sbx.files.get_info(directory)
    assert (created.owner, created.group, created.mode) == ("user", "user", 0o755)
    assert sbx.files.get_info(f"{directory}/x.txt").owner == "user"


def test_make_dir_creates_missing_directories_even_under_root_owned_ones(sbx):
    directory = f"/made-{secrets.token_hex(3)}"
    assert sbx.files.make_dir(f"{directory}/a/b") is True
    for path in (directory, f"{directory}/a", f"{directory}/a/b"):
        entry = sbx.files.get_info(path)
        assert (entry.owner, entry.mode) == ("user", 0o755)


def test_write_into_an_existing_root_owned_directory_stays_denied(sbx):
    with pytest.raises(Exception) as info:
        sbx.files.write("/usr/share/written-by-user.txt", "x")
    assert "permission denied" in str(info.value).lower()


def test_signed_upload_url_accepts_a_browser_form_with_a_string_file_field(sbx):
    url = sbx.upload_url("/tmp/from-browser.txt", user="user", use_signature_expiration=60)
    # What `const f = new FormData(); f.append("file", "typed text"); fetch(url, {method: "POST", body: f})`
    # sends: a multipart part named `file` with no filename.
    response = httpx.post(url, files={"file": (None, b"typed text")})
    assert response.status_code == 200, response.text
    assert response.json() == [{"name": "from-browser.txt", "type": "file", "path": "/tmp/from-browser.txt"}]
    assert sbx.files.read("/tmp/from-browser.txt") == "typed text"


def test_upload_of_a_string_file_field_without_a_path_is_refused(envd):
    response = httpx.post(f"{envd.url}/files", files={"file": (None, b"x")},
                          headers={"X-Access-Token": envd.token})
    assert response.status_code == 400
    assert response.json() == {"code": 400, "message": "a file part has no filename and no path was given"}


# --- metadata --------------------------------------------------------------------------------------


def test_user_xattrs_set_inside_the_sandbox_are_the_files_metadata(sbx):
    # /dev/shm is gVisor's own tmpfs, which stores extended attributes (the sandbox's disk cannot: below).
    sbx.commands.run("echo x > /dev/shm/tagged && python3 -c \"import os; "
                     "os.setxattr('/dev/shm/tagged', 'user.e2b.owner', b'agent-7')\"")
    assert sbx.files.get_info("/dev/shm/tagged").metadata == {"owner": "agent-7"}
    assert {e.name: e.metadata for e in sbx.files.list("/dev/shm")}["tagged"] == {"owner": "agent-7"}


def test_the_sandbox_disk_cannot_store_xattrs_under_this_runsc(sbx):
    """gVisor's gofer serves no extended attributes (runsc 20240729): envd keeps metadata of files on the
    sandbox's disk in its own sidecar instead, and `setfattr` inside fails. If this starts passing the other
    way, docs/envd.md's metadata section is out of date."""
    result = sbx.commands.run("echo x > ~/plain && python3 -c \"import os\ntry:\n"
                              "    os.setxattr('/home/user/plain', 'user.e2b.owner', b'x')\n"
                              "except OSError as e:\n    print(e.errno == 95)\"")
    assert result.stdout == "True\n"


@pytest.mark.parametrize("directory", ["/home/user", "/dev/shm"], ids=["sidecar-on-disk", "xattrs-on-tmpfs"])
def test_writing_a_file_again_without_metadata_clears_its_metadata(sbx, directory):
    path = f"{directory}/meta-{secrets.token_hex(3)}.txt"
    sbx.files.write(path, "first", metadata={"Owner": "agent-7", "step": "1"})
    assert sbx.files.get_info(path).metadata == {"owner": "agent-7", "step": "1"}
    sbx.files.write(path, "second", metadata={"step": "2"})
    assert sbx.files.get_info(path).metadata == {"step": "2"}
    written = sbx.files.write(path, "third")
    assert written.metadata is None
    assert sbx.files.get_info(path).metadata is None


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
