"""envd inside a real gVisor sandbox, driven by the unmodified `e2b` Python SDK (sync and async)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import secrets
import time

import httpx
import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    TimeoutException,
)

from corral.runtime.base import SandboxConfig
from tests.helpers.envd_client import async_client, envd_sandbox, init, sync_client

SANDBOX_ENV = {"SANDBOX_VAR": "from-sandbox", "OVERRIDE": "sandbox"}


@pytest.fixture(scope="module")
def envd(harness, runtime):
    with envd_sandbox(harness, runtime, envVars=SANDBOX_ENV, defaultUser="user",
                      defaultWorkdir="/home/user") as sandbox:
        yield sandbox


@pytest.fixture
def sbx(envd):
    return sync_client(envd.url, envd.token, envd.sandbox_id)


# --- commands --------------------------------------------------------------------------------------


def test_run_reports_output_user_cwd_and_environment(sbx):
    result = sbx.commands.run('echo "$SANDBOX_VAR $OVERRIDE $REQ"; echo oops >&2; whoami; pwd',
                              envs={"OVERRIDE": "request", "REQ": "r"})
    assert result.exit_code == 0
    assert result.stdout == "from-sandbox request r\nuser\n/home/user\n"
    assert result.stderr == "oops\n"
    as_root = sbx.commands.run("whoami; echo $HOME", user="root")
    assert as_root.stdout == "root\n/root\n"


def test_accounts_changed_by_commands_apply_to_the_next_request(sbx):
    name = "u" + secrets.token_hex(3)
    with pytest.raises(AuthenticationException):
        sbx.commands.run("true", user=name)
    sbx.commands.run(f"useradd --create-home {name}", user="root")
    assert sbx.commands.run("whoami; echo $HOME", user=name).stdout == f"{name}\n/home/{name}\n"
    sbx.commands.run(f"groupadd g{name} && usermod -aG g{name} {name}", user="root")
    assert f"g{name}" in sbx.commands.run("id -Gn", user=name).stdout.split()
    sbx.commands.run(f"userdel --remove {name}", user="root")  # no process of envd's runs as the user
    with pytest.raises(AuthenticationException):
        sbx.commands.run("true", user=name)
    # The default user's commands start from a resident spawner; it follows the account too, and a
    # command started before the change keeps its identity and still reports its exit.
    background = sbx.commands.run("sleep 2; id -Gn", background=True)
    sbx.commands.run(f"usermod -aG g{name} user", user="root")
    try:
        assert f"g{name}" in sbx.commands.run("id -Gn").stdout.split()
        assert f"g{name}" not in background.wait().stdout.split()
    finally:
        sbx.commands.run(f"gpasswd --delete user g{name} >/dev/null && groupdel g{name}", user="root")
    assert f"g{name}" not in sbx.commands.run("id -Gn").stdout.split()
    assert sbx.commands.run("pgrep -u user -f -c [s]pawner_child").stdout == "1\n"  # the old one is gone


def test_root_commands_keep_root_identity(sbx):
    assert sbx.commands.run("id -u; id -g; id -G; echo $HOME", user="root").stdout == "0\n0\n0\n/root\n"
    received = bytearray()
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), user="root", cwd="/root")
    time.sleep(1.0)  # interactive bash discards what is typed before its first prompt
    sbx.pty.send_stdin(terminal.pid, b"mesg; id -u; exit 0\n")
    assert terminal.wait(on_pty=received.extend).exit_code == 0
    assert b"is n" in received  # a root login at a terminal still runs ~/.profile's `mesg n`


def test_cwd_rules(sbx):
    sbx.commands.run("mkdir -p /home/user/proj/sub")
    assert sbx.commands.run("pwd", cwd="~/proj").stdout == "/home/user/proj\n"
    assert sbx.commands.run("pwd", cwd="proj/sub").stdout == "/home/user/proj/sub\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sbx.commands.run("pwd", cwd="/no/such/dir")


def test_nonzero_exit_raises_with_output(sbx):
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo out; echo err >&2; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "out\n"
    assert info.value.stderr == "err\n"


def test_output_callbacks_keep_order_across_chunks(sbx):
    seen: list[str] = []
    result = sbx.commands.run("for i in $(seq 1 2000); do echo line-$i; done", on_stdout=seen.append)
    assert "".join(seen) == result.stdout
    assert result.stdout.splitlines() == [f"line-{i}" for i in range(1, 2001)]


def test_background_connect_and_kill(sbx):
    handle = sbx.commands.run("for i in $(seq 1 300); do echo tick $i; sleep 0.1; done",
                              background=True)
    assert handle.pid in {p.pid for p in sbx.commands.list()}
    time.sleep(0.5)
    handle.disconnect()  # leaving the stream must not kill it
    time.sleep(0.3)
    assert handle.pid in {p.pid for p in sbx.commands.list()}
    again = sbx.commands.connect(handle.pid)
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code == -1
    assert "killed" in (info.value.error or "")
    assert handle.pid not in {p.pid for p in sbx.commands.list()}
    assert sbx.commands.kill(handle.pid) is False
    assert sbx.commands.run("pgrep -f 'ti[c]k' || true").stdout.strip() == ""


def test_connect_to_recently_exited_and_unknown_pid(sbx):
    handle = sbx.commands.run("echo done-soon", background=True)
    assert handle.wait().stdout == "done-soon\n"
    late = sbx.commands.connect(handle.pid)
    assert late.wait().exit_code == 0
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999_999)


def test_stdin_send_stream_and_close(sbx):
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "hello\n")
    sbx.commands.stream_input(handle.pid, [b"a", "b", b"c\n"])
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "hello\nabc\n"


def test_stdin_closed_by_default(sbx):
    assert sbx.commands.run("cat; echo eof").stdout == "eof\n"


def test_deadline_kills_the_process(sbx):
    marker = secrets.token_hex(4)
    with pytest.raises(TimeoutException):
        sbx.commands.run(f"sleep 30; echo {marker}", timeout=2)
    time.sleep(0.5)
    assert sbx.commands.run(f"pgrep -f '[s]leep 30; echo {marker}' || true").stdout.strip() == ""


def test_pty_session_with_resize(sbx):
    received = bytearray()
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), cwd="/tmp")
    time.sleep(1.0)  # interactive bash discards what is typed before its first prompt
    sbx.pty.send_stdin(terminal.pid, b"stty size; tty\n")
    time.sleep(0.5)
    sbx.pty.resize(terminal.pid, PtySize(rows=40, cols=100))
    sbx.pty.send_stdin(terminal.pid, b"stty size; exit 0\n")
    result = terminal.wait(on_pty=received.extend)
    assert result.exit_code == 0
    assert b"24 80" in received
    assert b"40 100" in received
    assert b"/dev/pts/" in received


# --- files -----------------------------------------------------------------------------------------


def test_write_read_and_info(sbx):
    info = sbx.files.write("notes/a.txt", "hello")
    assert info.path == "/home/user/notes/a.txt"
    assert sbx.files.read("/home/user/notes/a.txt") == "hello"
    entry = sbx.files.get_info("notes/a.txt")
    assert (entry.type, entry.size, entry.mode, entry.owner, entry.group) == (FileType.FILE, 5, 0o644, "user",
                                                                                "user")
    assert entry.permissions == "-rw-r--r--"
    directory = sbx.files.get_info("notes")
    assert directory.type == FileType.DIR and directory.mode == 0o755
    assert sbx.files.exists("notes/a.txt") and not sbx.files.exists("notes/none")
    with pytest.raises(FileNotFoundException):
        sbx.files.read("notes/none")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("notes/none")


def test_large_upload_and_download(sbx):
    data = os.urandom(50 * 1024 * 1024)
    sbx.files.write("/tmp/big.bin", data)
    assert hashlib.sha256(sbx.files.read("/tmp/big.bin", format="bytes")).digest() == hashlib.sha256(data).digest()
    streamed = b"".join(sbx.files.read("/tmp/big.bin", format="stream"))
    assert len(streamed) == len(data)
    sbx.files.remove("/tmp/big.bin")


def test_write_many_files_gzip_and_metadata(sbx):
    entries = [{"path": f"/tmp/many/{i}/f.txt", "data": f"file {i}"} for i in range(60)]
    written = sbx.files.write_files(entries)
    assert sorted(w.path for w in written) == sorted(e["path"] for e in entries)
    assert sbx.files.read("/tmp/many/42/f.txt") == "file 42"
    sbx.files.write("/tmp/z.txt", "squeezed " * 1000, gzip=True)
    assert sbx.files.read("/tmp/z.txt", gzip=True) == "squeezed " * 1000
    sbx.files.write("/tmp/meta.txt", "x", metadata={"Owner": "agent-7"})
    assert sbx.files.get_info("/tmp/meta.txt").metadata == {"owner": "agent-7"}


def test_list_make_dir_rename_remove(sbx):
    assert sbx.files.make_dir("/tmp/tree/a/b") is True
    assert sbx.files.make_dir("/tmp/tree/a/b") is False
    sbx.files.write("/tmp/tree/a/b/leaf.txt", "x")
    sbx.commands.run("ln -sf /tmp/tree/a/b/leaf.txt /tmp/tree/link")
    top = {e.name: e for e in sbx.files.list("/tmp/tree")}
    assert set(top) == {"a", "link"}
    assert top["link"].type == FileType.SYMLINK and top["link"].symlink_target == "/tmp/tree/a/b/leaf.txt"
    deep = {e.path for e in sbx.files.list("/tmp/tree", depth=3)}
    assert "/tmp/tree/a/b/leaf.txt" in deep
    moved = sbx.files.rename("/tmp/tree/a/b/leaf.txt", "/tmp/tree/moved.txt")
    assert moved.path == "/tmp/tree/moved.txt"
    with pytest.raises(FileNotFoundException):
        sbx.files.rename("/tmp/tree/none", "/tmp/tree/x")
    with pytest.raises(InvalidArgumentException):
        sbx.files.list("/tmp/tree/moved.txt")
    sbx.files.remove("/tmp/tree")
    sbx.files.remove("/tmp/tree")  # removing what is gone is fine
    assert not sbx.files.exists("/tmp/tree")


def test_watch_dir_polling_recursive(sbx):
    sbx.files.make_dir("/tmp/watched/sub")
    handle = sbx.files.watch_dir("/tmp/watched", recursive=True)
    sbx.files.write("/tmp/watched/sub/new.txt", "1")
    sbx.files.remove("/tmp/watched/sub/new.txt")
    events: list = []
    _wait_for(lambda: events.extend(handle.get_new_events()) or
              any(e.type == FilesystemEventType.REMOVE for e in events))
    handle.stop()
    names = {(e.name, e.type) for e in events}
    assert ("sub/new.txt", FilesystemEventType.CREATE) in names
    assert ("sub/new.txt", FilesystemEventType.REMOVE) in names


def test_files_as_user_respect_permissions(sbx):
    with pytest.raises(Exception) as info:
        sbx.files.read("../../etc/shadow")
    assert "permission denied" in str(info.value).lower()
    with pytest.raises(Exception) as info:
        sbx.files.write("../../etc/evil", "x")
    assert "permission denied" in str(info.value).lower()
    assert not sbx.files.exists("/etc/evil")
    sbx.files.write("/etc/allowed-for-root", "x", user="root")
    assert sbx.files.get_info("/etc/allowed-for-root").owner == "root"


def test_signed_urls(envd, sbx):
    upload = sbx.upload_url("/tmp/signed.txt", use_signature_expiration=60)
    response = httpx.post(upload, files={"file": ("signed.txt", b"via url")})
    assert response.status_code == 200, response.text
    download = sbx.download_url("/tmp/signed.txt", use_signature_expiration=60)
    assert httpx.get(download).content == b"via url"
    expired = sbx.download_url("/tmp/signed.txt", use_signature_expiration=-10)
    response = httpx.get(expired)
    assert response.status_code == 401
    assert response.json() == {"code": 401, "message": "signature is already expired"}
    forged = download.replace("signature=v1_", "signature=v1_X")
    assert httpx.get(forged).status_code == 401


def test_wrong_token_is_rejected(envd):
    intruder = sync_client(envd.url, "not-the-token", envd.sandbox_id)
    with pytest.raises(AuthenticationException):
        intruder.commands.run("true")
    with pytest.raises(AuthenticationException):
        intruder.files.read("/etc/hostname")
    anonymous = sync_client(envd.url, None, envd.sandbox_id)
    with pytest.raises(AuthenticationException):
        anonymous.files.list("/")


# --- async client ----------------------------------------------------------------------------------


def test_async_client_commands_files_and_streaming_watch(envd):
    async def scenario():
        sbx = async_client(envd.url, envd.token, envd.sandbox_id)
        result = await sbx.commands.run("echo async-$SANDBOX_VAR")
        assert result.stdout == "async-from-sandbox\n"
        await sbx.files.make_dir("/tmp/awatch/deep")
        events = []
        handle = await sbx.files.watch_dir("/tmp/awatch", on_event=events.append, recursive=True)
        await sbx.files.write("/tmp/awatch/deep/x.txt", "1")
        for _ in range(100):
            if any(e.name == "deep/x.txt" for e in events):
                break
            await asyncio.sleep(0.05)
        await handle.stop()
        assert any(e.name == "deep/x.txt" and e.type == FilesystemEventType.CREATE for e in events)
        background = await sbx.commands.run("sleep 20", background=True)
        assert await sbx.commands.kill(background.pid) is True
        with pytest.raises(TimeoutException):
            await sbx.commands.run("sleep 10", timeout=1)
        assert await sbx.files.read("/tmp/awatch/deep/x.txt") == "1"

    asyncio.run(scenario())


# --- identity after restore -------------------------------------------------------------------------


def test_restored_clones_take_different_tokens(harness, runtime, tmp_path):
    source = harness.run(runtime.create("base", SandboxConfig()))
    clones = []
    try:
        url = f"http://{source.address}:49983"
        assert init(url, accessToken="first").status_code == 204
        # A token-holding envd only accepts a new /init from its current token holder.
        assert init(url, accessToken="hijack").status_code == 401
        assert init(url, current_token="first", accessToken=None).status_code == 204
        harness.run(runtime.checkpoint(source.id, tmp_path / "ckpt", leave_running=True))
        clones = harness.run(runtime.restore(tmp_path / "ckpt", 2, SandboxConfig()))
        tokens = [secrets.token_hex(8) for _ in clones]
        for clone, token in zip(clones, tokens, strict=True):
            assert init(f"http://{clone.address}:49983", accessToken=token).status_code == 204
        for i, clone in enumerate(clones):
            curl = f"http://{clone.address}:49983"
            assert sync_client(curl, tokens[i]).commands.run("echo ok").stdout == "ok\n"
            with pytest.raises(AuthenticationException):
                sync_client(curl, tokens[1 - i]).commands.run("echo no")
    finally:
        for sb in [source, *clones]:
            harness.run(runtime.destroy(sb.id))


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_gzip_download_is_compressed_on_the_wire(envd, sbx):
    sbx.files.write("/tmp/plain.txt", "a" * 100_000)
    with httpx.stream("GET", f"{envd.url}/files", params={"path": "/tmp/plain.txt"},
                      headers={"X-Access-Token": envd.token, "Accept-Encoding": "gzip"}) as response:
        assert response.headers["content-encoding"] == "gzip"
        body = b"".join(response.iter_raw())
    assert len(body) < 1000
    assert gzip.decompress(body) == b"a" * 100_000


def test_envd_dependencies_are_invisible_to_the_users_python(sbx):
    from corral.templates.envd_layer import REQUIREMENTS

    listed = sbx.commands.run("python3 -m pip list --format=freeze 2>/dev/null").stdout.lower()
    for pin in REQUIREMENTS:
        assert pin.split("==")[0].lower().replace("_", "-") not in listed.replace("_", "-")
    probe = sbx.commands.run("python3 -c 'import starlette' 2>&1 || echo missing")
    assert "missing" in probe.stdout
    # What the user does to their own Python cannot reach envd: it still answers afterwards.
    sbx.commands.run("python3 -m pip install --quiet --no-index /nonexistent 2>/dev/null || true", user="root")
    assert sbx.commands.run("echo still-here").stdout == "still-here\n"


def test_users_spawner_identity_and_recovery(sbx):
    """`user`'s commands start from a spawner process running as `user` (no envd fork): they get the
    user's ids, groups, cwd and a session of their own; killing the spawner only costs one exit status."""
    result = sbx.commands.run("id -u; id -g; id -G; pwd; ps -o sid= -p $$; echo $$")
    uid, gid, groups, cwd, sid, pid = result.stdout.split("\n")[:6]
    assert (uid, gid, cwd) == ("1000", "1000", "/home/user")
    assert "1000" in groups.split()
    assert sid.strip() == pid  # session leader, so kill() reaches everything the command started
    spawner = sbx.commands.run("pgrep -u user -f '[s]pawner_child' || true").stdout.split()
    assert len(spawner) == 1
    try:
        sbx.commands.run(f"kill -9 {spawner[0]}; sleep 0.2")
    except CommandExitException as e:
        assert e.exit_code == -1  # its exit status went with the spawner
    assert sbx.commands.run("id -un").stdout == "user\n"
    replacement = sbx.commands.run("pgrep -u user -f '[s]pawner_child' || true").stdout.split()
    assert len(replacement) == 1 and replacement != spawner
