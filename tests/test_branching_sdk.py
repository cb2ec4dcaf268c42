"""Pause/resume, snapshots and fork through a real `corral serve`, driven by the unmodified `e2b` SDK."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import AsyncSandbox, Sandbox, SandboxException, SandboxNotFoundException, SandboxQuery, SandboxState

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t4", "10.206.0.0/22"
COUNTER = "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done' >/dev/null 2>&1 &"


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1)
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def key(server):
    return server.cli("keys", "create", "--name", "branching").strip()


@pytest.fixture
def opts(server, key):
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def api(server, key, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"X-API-KEY": key}, timeout=120, **kwargs)


def count(sbx) -> int:
    return int(sbx.commands.run("cat /tmp/count").stdout)


def checkpoint_dirs(server) -> set[str]:
    root = TEST_ROOT / INSTANCE / "data" / "checkpoints"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def resume_ready(server) -> int:
    return httpx.get(f"{server.url}/health", timeout=10).json()["resumeReady"]


def wait_resume_ready(server, expected: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while resume_ready(server) != expected:
        assert time.monotonic() < deadline, f"resumeReady stayed {resume_ready(server)}, expected {expected}"
        time.sleep(0.1)


def test_pause_list_connect_resumes_memory_and_files(server, key, opts):
    sbx = Sandbox.create(metadata={"t": "pause"}, envs={"MARK": "kept"}, timeout=120, **opts)
    try:
        sbx.commands.run(COUNTER)
        sbx.files.write("/home/user/state.txt", "before pause")
        sbx.commands.run("python3 -c 'import time; time.sleep(0.01)'")
        time.sleep(1)
        before = count(sbx)
        assert sbx.pause() is True
        assert sbx.pause() is False  # 409: already paused
        info = Sandbox.get_info(sbx.sandbox_id, **opts)
        assert info.state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED], metadata={"t": "pause"}), **opts)
        assert [s.sandbox_id for s in paused.next_items()] == [sbx.sandbox_id]
        raw = api(server, key, "GET", f"/sandboxes/{sbx.sandbox_id}").json()
        assert raw["pauseMode"] == "full"
        time.sleep(1.5)
        wait_resume_ready(server, 1)  # its container is prepared: the resume below takes it
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=60, **opts)
        assert resumed.sandbox_id == sbx.sandbox_id
        assert resume_ready(server) == 0
        assert resumed.files.read("/home/user/state.txt") == "before pause"
        assert resumed.commands.run("echo $MARK").stdout == "kept\n"
        after = count(resumed)
        # The counter went on from where it was: frozen while paused (1.5 s would be ~7 ticks more).
        assert before <= after <= before + 5, (before, after)
        time.sleep(0.5)
        assert count(resumed) > after  # and it keeps running
        assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.RUNNING
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)


def test_filesystem_only_pause_restarts_processes_and_keeps_files(server, key, opts):
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        sbx.commands.run(COUNTER)
        sbx.files.write("/home/user/fs.txt", "on disk")
        assert sbx.pause(mode="filesystem") is True
        assert api(server, key, "GET", f"/sandboxes/{sbx.sandbox_id}").json()["pauseMode"] == "filesystem"
        resumed = Sandbox.connect(sbx.sandbox_id, **opts)
        assert resumed.files.read("/home/user/fs.txt") == "on disk"
        # Cold-booted: the counter process is gone (its last value stays in the file).
        procs = resumed.commands.run("ps -eo args").stdout
        assert "while true" not in procs
        assert resumed.commands.run("whoami").stdout == "user\n"
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)


def test_pause_mid_command_then_reconnect_to_the_process(server, opts):
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        handle = sbx.commands.run("for i in $(seq 1 30); do echo $i >> /tmp/progress; sleep 0.1; done",
                                  background=True)
        time.sleep(0.5)
        sbx.pause()
        resumed = Sandbox.connect(sbx.sandbox_id, **opts)
        result = resumed.commands.connect(handle.pid).wait()
        assert result.exit_code == 0
        assert resumed.commands.run("wc -l < /tmp/progress").stdout.strip() == "30"
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)


def test_legacy_resume_endpoint_codes(server, key, opts):
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        assert api(server, key, "POST", f"/sandboxes/{sbx.sandbox_id}/resume", json={}).status_code == 409
        assert api(server, key, "POST", f"/sandboxes/{sbx.sandbox_id}/pause", json={}).status_code == 204
        assert api(server, key, "POST", f"/sandboxes/{sbx.sandbox_id}/pause", json={}).status_code == 409
        r = api(server, key, "POST", f"/sandboxes/{sbx.sandbox_id}/resume", json={"timeout": 60})
        assert r.status_code == 201 and r.json()["sandboxID"] == sbx.sandbox_id
        r = api(server, key, "POST", f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 60})
        assert r.status_code == 200
        assert api(server, key, "POST", "/sandboxes/nope/pause", json={}).status_code == 404
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)


def test_auto_pause_on_timeout_then_auto_resume_through_the_proxy(server, key, opts):
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": True}, **opts)
    try:
        sbx.commands.run("mkdir -p /tmp/www && echo served > /tmp/www/index.html")
        sbx.commands.run("cd /tmp/www && python3 -m http.server 8000", background=True)
        sbx.commands.run("sleep 0.5")
        host = sbx.get_host(8000)
        deadline = time.monotonic() + 10
        while Sandbox.get_info(sbx.sandbox_id, **opts).state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "the sandbox was not paused on timeout"
            time.sleep(0.2)
        lifecycle = api(server, key, "GET", f"/sandboxes/{sbx.sandbox_id}").json()["lifecycle"]
        assert lifecycle == {"autoResume": True, "onTimeout": "pause"}
        # A request for the paused sandbox resumes it and is then served.
        r = httpx.get(f"{server.url}/index.html", headers={"E2b-Sandbox-Id": sbx.sandbox_id,
                                                           "E2b-Sandbox-Port": "8000"}, timeout=30)
        assert r.status_code == 200 and r.text == "served\n", host
        assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.RUNNING
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)


def test_paused_without_auto_resume_is_not_resumed_by_traffic(server, opts):
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        sbx.pause()
        r = httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id,
                                                       "E2b-Sandbox-Port": "49983"})
        assert r.status_code == 502 and "not found" in r.text
        assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.PAUSED
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)


def test_snapshot_then_two_sandboxes_from_it(server, key, opts):
    src = Sandbox.create(timeout=120, **opts)
    try:
        src.files.write("/home/user/snap.txt", "in snapshot")
        snap = src.create_snapshot(name="e2e-snap")
        assert snap.names == ["e2e-snap"]
        src.files.write("/home/user/snap.txt", "after snapshot")  # the source runs on
        assert src.commands.run("echo alive").stdout == "alive\n"
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=src.sandbox_id, **opts).next_items()]
        assert listed == [snap.snapshot_id]
        a = Sandbox.create(template=snap.snapshot_id, timeout=60, **opts)
        b = Sandbox.create(template="e2e-snap", timeout=60, **opts)
        try:
            assert a.sandbox_id != b.sandbox_id != src.sandbox_id
            assert a.files.read("/home/user/snap.txt") == "in snapshot"
            a.files.write("/home/user/only-a", "a")
            assert not b.files.exists("/home/user/only-a")
            assert b.files.read("/home/user/snap.txt") == "in snapshot"
            assert a.commands.run("hostname").stdout.strip() == a.sandbox_id
            # In use by a running sandbox: deleting works and keeps what the sandbox stands on.
            assert Sandbox.delete_snapshot(snap.snapshot_id, **opts) is True
            assert Sandbox.delete_snapshot(snap.snapshot_id, **opts) is False
            assert a.files.read("/home/user/snap.txt") == "in snapshot"
            assert a.commands.run("cat /etc/hostname >/dev/null && echo ok").stdout == "ok\n"
        finally:
            a.kill()
            b.kill()
    finally:
        src.kill()
    with pytest.raises(SandboxException):
        Sandbox.create(template=snap.snapshot_id, **opts)


def test_snapshot_name_rules(server, key, opts):
    src = Sandbox.create(timeout=60, **opts)
    try:
        r = api(server, key, "POST", f"/sandboxes/{src.sandbox_id}/snapshots", json={"name": "base"})
        assert r.status_code == 400 and "template" in r.json()["message"]
        r = api(server, key, "POST", f"/sandboxes/{src.sandbox_id}/snapshots", json={"name": "../x"})
        assert r.status_code == 400
        assert api(server, key, "POST", "/sandboxes/nope/snapshots", json={}).status_code == 404
        assert api(server, key, "DELETE", "/templates/nope").status_code == 404
    finally:
        src.kill()


def _fork_and_check_divergence(opts, source, forks):
    assert len(forks) == 3 and all(isinstance(f, Sandbox) for f in forks), forks
    ids = {f.sandbox_id for f in forks}
    assert len(ids) == 3 and source.sandbox_id not in ids
    try:
        for f in forks:
            assert f.files.read("/home/user/base.txt") == "shared"
        forks[0].files.write("/home/user/mine.txt", "first")
        assert [f.files.exists("/home/user/mine.txt") for f in forks] == [True, False, False]
        randoms = {f.commands.run("head -c 16 /dev/urandom | od -An -tx1").stdout for f in forks}
        uuids = {f.commands.run("python3 -c 'import uuid; print(uuid.uuid4())'").stdout for f in forks}
        assert len(randoms) == 3 and len(uuids) == 3
        assert {f.commands.run("hostname").stdout.strip() for f in forks} == ids
    finally:
        for f in forks:
            f.kill()


def test_fork_running_sandbox_three_ways(server, opts):
    src = Sandbox.create(timeout=120, **opts)
    try:
        src.files.write("/home/user/base.txt", "shared")
        end_before = src.get_info().end_at
        forks = src.fork(count=3, timeout=60)
        # The source keeps running with the same id and timeout.
        assert src.commands.run("echo still").stdout == "still\n"
        assert src.get_info().end_at == end_before
        assert not src.files.exists("/home/user/mine.txt")
        _fork_and_check_divergence(opts, src, forks)
    finally:
        src.kill()


def test_fork_paused_sandbox_three_ways(server, key, opts):
    src = Sandbox.create(timeout=120, **opts)
    try:
        src.files.write("/home/user/base.txt", "shared")
        src.pause()
        forks = Sandbox.fork(src.sandbox_id, count=3, timeout=60, **opts)
        assert Sandbox.get_info(src.sandbox_id, **opts).state == SandboxState.PAUSED
        _fork_and_check_divergence(opts, src, forks)
        resumed = Sandbox.connect(src.sandbox_id, **opts)
        assert resumed.files.read("/home/user/base.txt") == "shared"
    finally:
        Sandbox.kill(src.sandbox_id, **opts)


def test_fork_errors(server, key, opts):
    assert api(server, key, "POST", "/sandboxes/nope/fork", json={"count": 1}).status_code == 404
    src = Sandbox.create(timeout=60, **opts)
    try:
        for bad in (0, 101):
            r = api(server, key, "POST", f"/sandboxes/{src.sandbox_id}/fork", json={"count": bad})
            assert r.status_code == 400 and "count" in r.json()["message"]
    finally:
        src.kill()


def test_fork_a_sandbox_being_killed(server, key, opts):
    src = Sandbox.create(timeout=60, **opts)

    async def race():
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-KEY": key}, timeout=60) as client:
            return await asyncio.gather(client.delete(f"/sandboxes/{src.sandbox_id}"),
                                        client.post(f"/sandboxes/{src.sandbox_id}/fork", json={"count": 2}))

    killed, forked = asyncio.run(race())
    assert killed.status_code == 204
    # Either the fork went first (two forks, then the kill) or the kill did (404): never a half state.
    if forked.status_code == 201:
        for item in forked.json():
            assert item["sandbox"] is not None
            api(server, key, "DELETE", f"/sandboxes/{item['sandbox']['sandboxID']}")
    else:
        assert forked.status_code == 404, forked.text
    assert api(server, key, "GET", f"/sandboxes/{src.sandbox_id}").status_code == 404


def test_async_sdk_pause_connect_fork(server, opts):
    async def scenario():
        sbx = await AsyncSandbox.create(timeout=120, **opts)
        try:
            await sbx.files.write("/home/user/a.txt", "async")
            assert await sbx.pause() is True
            assert (await AsyncSandbox.get_info(sbx.sandbox_id, **opts)).state == SandboxState.PAUSED
            again = await AsyncSandbox.connect(sbx.sandbox_id, **opts)
            assert await again.files.read("/home/user/a.txt") == "async"
            (fork,) = await again.fork(count=1)
            try:
                assert await fork.files.read("/home/user/a.txt") == "async"
            finally:
                await fork.kill()
        finally:
            await AsyncSandbox.kill(sbx.sandbox_id, **opts)

    asyncio.run(scenario())


def test_killing_a_paused_sandbox_frees_its_checkpoint(server, opts):
    sbx = Sandbox.create(timeout=60, **opts)
    before = checkpoint_dirs(server)
    sbx.pause()
    (pause_dir,) = checkpoint_dirs(server) - before
    wait_resume_ready(server, 1)
    assert Sandbox.kill(sbx.sandbox_id, **opts) is True
    assert resume_ready(server) == 0  # what was prepared for its resume is gone with it
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **opts)
    assert pause_dir not in checkpoint_dirs(server)


def test_restart_with_paused_sandboxes(server, key, opts):
    sbx = Sandbox.create(timeout=120, **opts)
    sbx.commands.run(COUNTER)
    sbx.files.write("/home/user/survives.txt", "restart")
    time.sleep(0.5)
    sbx.pause()
    server.stop(signal.SIGKILL)
    server.start()
    try:
        assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.PAUSED
        resumed = Sandbox.connect(sbx.sandbox_id, **opts)
        assert resumed.files.read("/home/user/survives.txt") == "restart"
        first = count(resumed)
        time.sleep(0.5)
        assert count(resumed) > first
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)


def test_js_sdk_pause_connect_fork(server, key, monkeypatch):
    from tests.helpers.node import run_script

    for name, value in server.sdk_env(key).items():
        monkeypatch.setenv(name, value)
    result = run_script("branching.mjs")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert [line for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "ok pause and connect", "ok fork"]


def _du(path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_checkpoint_tree_depth_three_width_three(server, key, opts):
    from corral.client import Checkpoints, CorralError

    path = "/home/user/path.txt"
    store = TEST_ROOT / INSTANCE / "data" / "checkpoints"
    with Checkpoints(server.url, key) as tree_api:
        def child_of(node_id: str, step: str, score: int) -> str:
            (started,) = tree_api.start(node_id, timeout=60)
            assert started.error is None, started.error
            sbx = Sandbox.connect(started.sandbox_id, **opts)
            sbx.commands.run(f"echo -n /{step} >> {path} && head -c 2000000 /dev/urandom > /home/user/blob{step}")
            node = sbx.create_snapshot().snapshot_id
            tree_api.set_metadata(node, score=score, step=step)
            sbx.kill()
            return node

        first = Sandbox.create(timeout=60, **opts)
        first.files.write(path, "r")
        root = first.create_snapshot().snapshot_id
        tree_api.set_metadata(root, score=-1)
        first.kill()
        level1 = [child_of(root, str(i), i) for i in range(3)]
        level2 = {parent: [child_of(parent, f"{i}{j}", 10 * i + j) for j in range(3)]
                  for i, parent in enumerate(level1)}

        tree = tree_api.tree(root)
        assert [r.id for r in tree.roots] == [root]
        assert [c.id for c in tree.roots[0].children] == level1
        assert all([c.id for c in node.children] == level2[node.id] for node in tree.roots[0].children)
        assert len(tree.nodes()) == 13 and tree.total_bytes == sum(n.size_bytes for n in tree.nodes())
        # The same lineage is found from any node in it.
        assert {n.id for n in tree_api.tree(level2[level1[1]][2]).nodes()} == {n.id for n in tree.nodes()}

        # Restore the best leaf and its grandparent (the root).
        best = max(tree.nodes(), key=lambda n: n.metadata["score"])
        assert best.metadata == {"score": 22, "step": "22"} and best.parent_id == level1[2]
        grandparent = tree_api.get(best.parent_id).parent_id
        assert grandparent == root
        (leaf,) = tree_api.start(best.id, timeout=60)
        (top,) = tree_api.start(grandparent, timeout=60)
        assert Sandbox.connect(leaf.sandbox_id, **opts).files.read(path) == "r/2/22"
        assert Sandbox.connect(top.sandbox_id, **opts).files.read(path) == "r"
        drawn = server.cli("tree", "show", leaf.sandbox_id, "--url", server.url, "--api-key", key)
        assert best.id in drawn and root in drawn and leaf.sandbox_id in drawn
        Sandbox.kill(leaf.sandbox_id, **opts)
        Sandbox.kill(top.sandbox_id, **opts)

        # Deleting a subtree gives its disk space back.
        before = _du(store)
        deleted = tree_api.delete(level1[0], subtree=True)
        assert sorted(deleted.deleted) == sorted([level1[0], *level2[level1[0]]])
        assert deleted.reclaimed_bytes > 4 * 2_000_000 and deleted.retained_bytes == 0
        assert _du(store) <= before - deleted.reclaimed_bytes + 65536
        assert not any((store / n).exists() for n in deleted.deleted)
        assert len(tree_api.tree(root).nodes()) == 9

        # Deleting an inner node moves its children up; their files keep what they stood on.
        middle = level1[1]
        result = tree_api.delete(middle)
        assert result.deleted == [middle] and result.retained_bytes > 0
        after = tree_api.tree(root)
        assert set(level2[middle]) <= {c.id for c in after.roots[0].children}
        (orphan,) = tree_api.start(level2[middle][0], timeout=60)
        assert Sandbox.connect(orphan.sandbox_id, **opts).files.read(path) == "r/1/10"
        Sandbox.kill(orphan.sandbox_id, **opts)
        with pytest.raises(CorralError) as missing:
            tree_api.get(middle)
        assert missing.value.status == 404

        # Removing the rest frees everything, including the retained layer of the deleted middle node.
        everything = tree_api.delete(root, subtree=True)
        assert len(everything.deleted) == 8
        leaves = [n for kids in level2.values() for n in kids]
        assert not any((store / n).exists() for n in [root, middle, *level1, *leaves])


def test_deleting_a_snapshot_while_sandboxes_start_from_it(server, key, opts):
    src = Sandbox.create(timeout=60, **opts)
    src.files.write("/home/user/x.txt", "x")
    snap = src.create_snapshot().snapshot_id
    src.kill()

    async def race():
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-KEY": key}, timeout=120) as client:
            start = asyncio.create_task(client.post(f"/checkpoints/{snap}/sandboxes", json={"count": 4}))
            await asyncio.sleep(0.3)
            return await client.delete(f"/templates/{snap}"), await start

    deleted, started = asyncio.run(race())
    assert started.status_code == 201
    ids = [item["sandbox"]["sandboxID"] for item in started.json()]
    assert len(ids) == 4  # every start succeeded whatever the delete did
    try:
        if deleted.status_code == 409:
            assert "in use" in deleted.json()["message"]
            assert api(server, key, "DELETE", f"/templates/{snap}").status_code == 204
        else:
            assert deleted.status_code == 204
        for sandbox_id in ids:  # the running sandboxes keep what they stand on
            assert Sandbox.connect(sandbox_id, **opts).files.read("/home/user/x.txt") == "x"
    finally:
        for sandbox_id in ids:
            Sandbox.kill(sandbox_id, **opts)


def test_a_deleted_file_held_open_refuses_the_pause_with_its_path_and_leaves_the_sandbox_running(server, key, opts):
    """gVisor cannot checkpoint a deleted file that is still open: 409 naming it, the sandbox unchanged; once
    the holder lets go, the pause goes through."""
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        holder = sbx.commands.run("exec 3>/home/user/held.tmp; rm /home/user/held.tmp; exec sleep 600",
                                  background=True)
        time.sleep(1)
        response = api(server, key, "POST", f"/sandboxes/{sbx.sandbox_id}/pause")
        assert response.status_code == 409, response.text
        assert "/home/user/held.tmp" in response.json()["message"]
        assert sbx.commands.run("echo still running").stdout == "still running\n"
        assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.RUNNING
        holder.kill()
        time.sleep(0.5)
        assert sbx.pause() is True
    finally:
        sbx.kill()
