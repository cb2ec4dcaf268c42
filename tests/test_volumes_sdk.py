"""Volumes through a real `corral serve` and the unmodified `e2b` SDK: the control plane (`Volume.create`,
`get_info`, `list`, `destroy`), the content API with each volume's own token, `volume_mounts` in
sandboxes (data outlives them, is shared by concurrent mounts, survives pause/resume and fork), the
fixed-size quota (ENOSPC inside, 507 outside) and nothing left behind on the host."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import (
    AsyncSandbox,
    AsyncVolume,
    AuthenticationException,
    Sandbox,
    SandboxException,
    Volume,
    VolumeException,
    VolumeNotFoundException,
    VolumePathNotFoundException,
)

from tests.helpers.server import CLI, ServerProcess

INSTANCE, NETWORK = "t12", "10.227.0.0/22"
VOLUMES = TEST_ROOT / INSTANCE / "data" / "volumes"


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1)
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def key(server):
    return server.cli("keys", "create", "--name", "volumes").strip()


@pytest.fixture()
def opts(server, key, monkeypatch):
    # The content API's base URL: E2B_VOLUME_API_URL, else https://api.<domain> (E2B_API_URL is not used).
    monkeypatch.setenv("E2B_VOLUME_API_URL", server.url)
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


@pytest.fixture()
def volumes(opts):
    """Volumes a test makes; destroyed after it."""
    made: list[Volume] = []

    def make(name: str) -> Volume:
        volume = Volume.create(name, **opts)
        made.append(volume)
        return volume

    yield make
    for volume in made:
        Volume.destroy(volume.volume_id, **opts)


def api(server, key, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"X-API-KEY": key}, timeout=120, **kwargs)


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(VOLUMES) + "/")]


def loop_devices_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()


# --- the control plane -------------------------------------------------------------------------------


def test_create_get_list_and_destroy(server, key, opts):
    volume = Volume.create("control-plane", **opts)
    assert volume.volume_id.startswith("vol_") and volume.token
    info = Volume.get_info(volume.volume_id, **opts)
    assert (info.volume_id, info.name, info.token) == (volume.volume_id, "control-plane", volume.token)
    assert Volume.connect(volume.volume_id, **opts).token == volume.token
    assert [v.name for v in Volume.list(**opts)] == ["control-plane"]
    raw = api(server, key, "POST", "/volumes", json={"name": "raw-answer"})
    assert raw.status_code == 201 and {"volumeID", "name", "token"} <= set(raw.json())
    assert Volume.destroy(raw.json()["volumeID"], **opts) is True
    assert Volume.destroy(volume.volume_id, **opts) is True
    assert Volume.destroy(volume.volume_id, **opts) is False
    with pytest.raises(VolumeNotFoundException):
        Volume.get_info(volume.volume_id, **opts)
    assert not (VOLUMES / volume.volume_id).exists()


def test_duplicate_and_bad_names_are_refused(volumes, opts):
    volumes("twice")
    with pytest.raises(VolumeException, match="409: a volume named 'twice' exists already"):
        Volume.create("twice", **opts)
    for bad in ("has space", "dots.not.allowed", "", "x" * 129):
        with pytest.raises(VolumeException, match=r"400: .*letters, digits"):
            Volume.create(bad, **opts)


def test_size_is_a_corral_extension_with_limits(server, key):
    too_big = api(server, key, "POST", "/volumes", json={"name": "huge", "sizeMB": 10**9})
    assert too_big.status_code == 400 and "maximum" in too_big.json()["message"]
    too_small = api(server, key, "POST", "/volumes", json={"name": "tiny", "sizeMB": 1})
    assert too_small.status_code == 400 and "between 16" in too_small.json()["message"]


def test_volumes_of_another_key_are_invisible(server, volumes, opts):
    mine = volumes("private")
    other = {**opts, "api_key": server.cli("keys", "create", "--name", "other").strip()}
    assert Volume.list(**other) == []
    with pytest.raises(VolumeNotFoundException):
        Volume.get_info(mine.volume_id, **other)
    assert Volume.destroy(mine.volume_id, **other) is False


# --- the content API ---------------------------------------------------------------------------------


def test_content_api_write_read_list_update_remove(volumes):
    volume = volumes("content")
    written = volume.write_file("/hello.txt", "hello volume")
    assert (written.name, written.type.value, written.size, written.mode) == ("hello.txt", "file", 12, 0o644)
    assert volume.read_file("/hello.txt") == "hello volume"
    assert volume.read_file("hello.txt", format="bytes") == b"hello volume"
    with pytest.raises(VolumeException, match=r"409: .*force"):
        volume.write_file("/hello.txt", "again")
    volume.write_file("/hello.txt", "replaced", force=True)
    assert volume.read_file("/hello.txt") == "replaced"
    with pytest.raises(VolumePathNotFoundException):
        volume.write_file("/no/such/dir/file.txt", "x")
    made = volume.make_dir("/a/b/c", force=True)
    assert (made.type.value, made.path, made.mode) == ("directory", "/a/b/c", 0o755)
    with pytest.raises(VolumeException, match="409"):
        volume.make_dir("/a")
    assert [e.name for e in volume.list("/")] == ["a", "hello.txt"]
    assert [e.path for e in volume.list("/a", depth=2)] == ["/a/b", "/a/b/c"]
    assert volume.update_metadata("/hello.txt", mode=0o600).mode == 0o600
    assert volume.exists("/a/b") and not volume.exists("/nope")
    volume.remove("/a")
    assert not volume.exists("/a/b/c")
    with pytest.raises(VolumePathNotFoundException):
        volume.remove("/")
    with pytest.raises(VolumePathNotFoundException):
        volume.get_info("/a")


def test_a_token_of_one_volume_cannot_touch_another(volumes, opts):
    first, second = volumes("first"), volumes("second")
    second.write_file("/private.txt", "second's")
    borrowed = Volume(second.volume_id, second.name, token=first.token)
    with pytest.raises(AuthenticationException):
        borrowed.read_file("/private.txt")
    with pytest.raises(AuthenticationException):
        borrowed.write_file("/planted.txt", "x")
    assert not second.exists("/planted.txt")
    forged = Volume(second.volume_id, second.name, token="vtok_forged")
    with pytest.raises(AuthenticationException):
        forged.list("/")


def test_content_errors_carry_a_string_code_and_a_message(server, volumes):
    volume = volumes("errors")
    answer = httpx.get(f"{server.url}/volumecontent/{volume.volume_id}/path", params={"path": "/missing"},
                       headers={"Authorization": f"Bearer {volume.token}"})
    assert answer.status_code == 404
    assert answer.json() == {"code": "not_found", "message": "path /missing does not exist in the volume",
                             "requestID": answer.headers["x-request-id"]}
    unauthorized = httpx.get(f"{server.url}/volumecontent/{volume.volume_id}/path", params={"path": "/"})
    assert unauthorized.status_code == 401 and unauthorized.json()["code"] == "unauthorized"


# --- volumes in sandboxes ----------------------------------------------------------------------------


def test_data_moves_between_the_api_and_sandboxes_and_outlives_them(volumes, opts):
    volume = volumes("shared-data")
    volume.write_file("/from-api.txt", "written through the API")
    first = Sandbox.create(volume_mounts={"/mnt/data": volume}, **opts)
    try:
        assert first.commands.run("cat /mnt/data/from-api.txt").stdout == "written through the API"
        first.commands.run("echo written in a sandbox > /mnt/data/from-sandbox.txt")  # as `user`
        assert [(m["name"], m["path"]) for m in first.get_info().volume_mounts] == [("shared-data", "/mnt/data")]
    finally:
        first.kill()
    assert volume.read_file("/from-sandbox.txt") == "written in a sandbox\n"
    second = Sandbox.create(volume_mounts={"/data": "shared-data"}, **opts)
    try:
        assert second.commands.run("cat /data/from-api.txt /data/from-sandbox.txt").stdout == (
            "written through the APIwritten in a sandbox\n")
    finally:
        second.kill()


def test_concurrent_mounts_share_files(volumes, opts):
    volume = volumes("concurrent")
    one = Sandbox.create(volume_mounts={"/mnt/v": volume}, **opts)
    two = Sandbox.create(volume_mounts={"/mnt/v": volume}, **opts)
    try:
        one.commands.run("echo from one > /mnt/v/note.txt")
        assert two.commands.run("cat /mnt/v/note.txt").stdout == "from one\n"
        volume.write_file("/api.txt", "from the api")
        assert one.commands.run("cat /mnt/v/api.txt").stdout == "from the api"
    finally:
        one.kill()
        two.kill()


def test_a_full_volume_gives_enospc_inside_and_507_outside(server, key, opts):
    made = api(server, key, "POST", "/volumes", json={"name": "small", "sizeMB": 20}).json()
    volume = Volume.connect(made["volumeID"], **{k: v for k, v in opts.items() if k != "sandbox_url"})
    sandbox = Sandbox.create(volume_mounts={"/mnt/small": "small"}, **opts)
    try:
        result = sandbox.commands.run("dd if=/dev/zero of=/mnt/small/fill bs=1M count=40 2>&1 || true")
        assert "No space left on device" in result.stdout
        with pytest.raises(VolumeException, match="507: the volume is full"):
            volume.write_file("/more.bin", b"x" * (4 << 20))
        assert not volume.exists("/more.bin")
    finally:
        sandbox.kill()
        Volume.destroy(volume.volume_id, **opts)


def test_pause_and_resume_keep_the_mount_and_its_data(volumes, opts):
    volume = volumes("paused")
    sandbox = Sandbox.create(volume_mounts={"/mnt/p": volume}, **opts)
    try:
        sandbox.commands.run("echo before > /mnt/p/before.txt")
        sandbox.pause()
        volume.write_file("/while-paused.txt", "written while paused")
        sandbox.connect()
        assert sandbox.commands.run("cat /mnt/p/before.txt /mnt/p/while-paused.txt").stdout == (
            "before\nwritten while paused")
        sandbox.commands.run("echo after > /mnt/p/after.txt")
        assert volume.read_file("/after.txt") == "after\n"
    finally:
        sandbox.kill()


def test_a_fork_shares_the_same_volume(volumes, opts):
    volume = volumes("forked")
    source = Sandbox.create(volume_mounts={"/mnt/f": volume}, **opts)
    try:
        source.commands.run("echo source > /mnt/f/source.txt")
        (fork,) = source.fork(count=1, timeout=60)
        try:
            assert fork.commands.run("cat /mnt/f/source.txt").stdout == "source\n"
            fork.commands.run("echo fork > /mnt/f/fork.txt")
            assert source.commands.run("cat /mnt/f/fork.txt").stdout == "fork\n"
            assert [m["name"] for m in fork.get_info().volume_mounts] == ["forked"]
        finally:
            fork.kill()
    finally:
        source.kill()


def test_a_symlink_made_in_a_sandbox_does_not_lead_the_api_out_of_the_volume(volumes, opts):
    volume = volumes("symlinks")
    sandbox = Sandbox.create(volume_mounts={"/mnt/s": volume}, **opts)
    try:
        sandbox.commands.run("ln -s / /mnt/s/root && ln -s ../../../../etc /mnt/s/up", user="root")
    finally:
        sandbox.kill()
    for path in ("/root/etc/passwd", "/up/passwd"):
        with pytest.raises(VolumePathNotFoundException):
            volume.read_file(path)
    assert volume.get_info("/root").target == "/"


def test_deleting_a_mounted_volume_is_refused_and_then_leaves_nothing(volumes, opts):
    volume = Volume.create("to-delete", **opts)
    image = VOLUMES / volume.volume_id / "image"
    sandbox = Sandbox.create(volume_mounts={"/mnt/d": volume}, **opts)
    try:
        with pytest.raises(VolumeException, match=f"409: volume 'to-delete' is mounted by {sandbox.sandbox_id}"):
            Volume.destroy(volume.volume_id, **opts)
    finally:
        sandbox.kill()
    assert loop_devices_of(image)
    assert Volume.destroy(volume.volume_id, **opts) is True
    assert not (VOLUMES / volume.volume_id).exists()
    assert not [m for m in host_mounts() if volume.volume_id in m]
    assert not loop_devices_of(image)


def test_bad_mount_requests_fail_with_a_message_and_leave_no_sandbox(volumes, opts):
    volume = volumes("mountable")
    cases = [({"/mnt/x": "no-such-volume"}, "400: volume 'no-such-volume' does not exist"),
             ({"relative/path": volume}, "400: volume mount path 'relative/path' must be an absolute path"),
             ({"/": volume}, "400: a volume cannot be mounted at /"),
             ({"/proc/v": volume}, "400: volume mount paths cannot be inside /proc"),
             ({"/run/corral/volumes/x": volume}, "400: volume mount paths cannot be inside Corral's directory"),
             ({"/mnt/../etc": volume}, "400: volume mount paths must not contain '.' or '..'"),
             ({"/a": volume, "/a/": volume}, "400: two volumes cannot be mounted at the same path")]
    for mounts, message in cases:
        with pytest.raises(SandboxException, match=message):
            Sandbox.create(volume_mounts=mounts, **opts)
    assert Sandbox.list(**opts).next_items() == []


def test_async_sdk_flow(volumes, opts):
    async def scenario():
        volume = await AsyncVolume.create("async-flow", **opts)
        try:
            await volume.write_file("/a.txt", "async")
            sandbox = await AsyncSandbox.create(volume_mounts={"/mnt/a": volume}, **opts)
            try:
                assert (await sandbox.commands.run("cat /mnt/a/a.txt")).stdout == "async"
                await sandbox.commands.run("echo back > /mnt/a/b.txt")
            finally:
                await sandbox.kill()
            assert await volume.read_file("/b.txt") == "back\n"
        finally:
            await AsyncVolume.destroy(volume.volume_id, **opts)

    asyncio.run(scenario())


def test_a_restarted_server_mounts_its_volumes_again(server, volumes, opts):
    volume = volumes("restart")
    volume.write_file("/kept.txt", "kept")
    server.stop()
    subprocess.run(["umount", str(VOLUMES / volume.volume_id / "data")], check=True)  # as after a reboot
    server.start(wait_pool=1)
    assert volume.read_file("/kept.txt") == "kept"


def test_the_cli_creates_lists_and_removes_volumes(server, key, opts):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "volume", *args, "--url", server.url, "--api-key", key],
                              capture_output=True, text=True, env=server.env)

    created = cli("create", "cli-made", "--size", "64")
    assert created.returncode == 0, created.stderr
    volume_id = created.stdout.strip()
    listed = cli("ls", "--json")
    assert {"volumeID": volume_id, "name": "cli-made"} in [
        {k: v for k, v in row.items() if k in ("volumeID", "name")} for row in json.loads(listed.stdout)]
    assert Volume.get_info(volume_id, **opts).name == "cli-made"
    refused = cli("create", "bad name!")
    assert refused.returncode != 0 and "name" in (refused.stderr + refused.stdout).lower()
    assert cli("rm", "cli-made").returncode == 0
    assert volume_id not in cli("ls", "--json").stdout
    assert cli("rm", "cli-made").returncode != 0  # already gone: a clear failure, not a silent success
