"""Checkpoint and restore: memory, processes and files come back; clones are independent."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from corral.runtime.base import CheckpointInvalid, SandboxConfig, SandboxFailed

COUNTER_SERVER = """
import http.server, socketserver
count = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        count += 1
        body = str(count).encode()
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
socketserver.TCPServer.allow_reuse_address = True
socketserver.TCPServer(('0.0.0.0', 8000), H).serve_forever()
"""


def get(runtime, sandbox_id: str) -> int:
    host, port = runtime.address(sandbox_id, 8000)
    deadline = time.time() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=2) as resp:
                return int(resp.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def counter_sandbox(harness, runtime, store, tmp_path):
    """A sandbox whose init runs a counter server. Processes must be started from inside the sandbox to
    be part of a checkpoint: gVisor drops processes started by `runsc exec` on restore."""
    app = tmp_path / "app-layer"
    (app / "opt").mkdir(parents=True)
    (app / "opt" / "counter.py").write_text(COUNTER_SERVER)
    meta = json.loads((store.resolve("base") / "checkpoint.json").read_text())
    layers = [app, *[Path(p) for p in meta["lowers"]]]
    sb = harness.run(runtime.boot(layers, ["/usr/bin/tini", "--", "sh", "-c",
                                           "python3 /opt/counter.py & exec sleep infinity"], SandboxConfig()))
    harness.run(runtime.exec(sb.id, ["sh", "-c", "echo before > /home/user/pre.txt"]))
    for expected in (1, 2, 3):
        assert get(runtime, sb.id) == expected
    yield sb
    if sb.id in {s.id for s in runtime.list()}:
        harness.run(runtime.destroy(sb.id))


def test_processes_started_by_out_of_band_exec_are_not_restored(harness, runtime, counter_sandbox, tmp_path):
    harness.run(runtime.exec(counter_sandbox.id, ["sh", "-c", "nohup sleep 1234 </dev/null >/dev/null 2>&1 &"]))
    ckpt = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "ckpt"))
    (clone,) = harness.run(runtime.restore(ckpt.path, 1, SandboxConfig()))
    try:
        ps = harness.run(runtime.exec(clone.id, ["ps", "-eo", "args"])).stdout.decode()
        assert "counter.py" in ps
        assert "sleep 1234" not in ps  # documented limitation (docs/runtime.md)
    finally:
        harness.run(runtime.destroy(clone.id))


def test_restore_three_clones_continue_memory_and_files_independently(harness, runtime, counter_sandbox,
                                                                      tmp_path):
    ckpt = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "ckpt", leave_running=True))
    assert ckpt.size_bytes > 0
    clones = harness.run(runtime.restore(ckpt.path, 3, SandboxConfig()))
    try:
        assert len({c.address for c in clones}) == 3
        for clone in clones:
            assert get(runtime, clone.id) == 4  # the counter continues from the checkpoint in each clone
            r = harness.run(runtime.exec(clone.id, ["cat", "/home/user/pre.txt"]))
            assert r.stdout == b"before\n"
        for i, clone in enumerate(clones):
            harness.run(runtime.exec(clone.id, ["sh", "-c", f"echo {i} > /home/user/mine.txt"]))
        for i, clone in enumerate(clones):
            r = harness.run(runtime.exec(clone.id, ["cat", "/home/user/mine.txt"]))
            assert r.stdout == f"{i}\n".encode()
        assert get(runtime, clones[0].id) == 5
        assert get(runtime, clones[1].id) == 5
        # The source kept running and is untouched by its clones.
        assert get(runtime, counter_sandbox.id) == 4
        r = harness.run(runtime.exec(counter_sandbox.id, ["test", "-e", "/home/user/mine.txt"]))
        assert r.exit_code == 1
    finally:
        for clone in clones:
            harness.run(runtime.destroy(clone.id))


def test_restored_sandbox_can_be_checkpointed_again(harness, runtime, counter_sandbox, tmp_path):
    first = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "gen1"))
    (child,) = harness.run(runtime.restore(first.path, 1, SandboxConfig()))
    harness.run(runtime.exec(child.id, ["sh", "-c", "echo gen1 > /home/user/gen1.txt"]))
    assert get(runtime, child.id) == 4
    second = harness.run(runtime.checkpoint(child.id, tmp_path / "gen2", leave_running=False))
    (grandchild,) = harness.run(runtime.restore(second.path, 1, SandboxConfig()))
    try:
        assert get(runtime, grandchild.id) == 5
        r = harness.run(runtime.exec(grandchild.id, ["cat", "/home/user/pre.txt", "/home/user/gen1.txt"]))
        assert r.stdout == b"before\ngen1\n"
    finally:
        harness.run(runtime.destroy(grandchild.id))


def test_sandbox_writes_never_reach_the_template(harness, runtime, store, sandbox_factory):
    sb = sandbox_factory()
    harness.run(runtime.exec(sb.id, ["sh", "-c", "echo x > /etc/corral-marker && rm /etc/hostname"]))
    snapshot = store.resolve("base")
    layers = [snapshot / "layer", *runtime.table.get(sb.id).lowers]
    assert not any((layer / "etc" / "corral-marker").exists() for layer in layers)
    assert any((layer / "etc" / "hostname").exists() for layer in layers)


def runsc_status(harness, runtime, sandbox_id: str) -> str:
    """What runsc itself says of the container ("running", "paused", ...)."""
    return harness.run(runtime.runsc.state(sandbox_id)).status


def test_freeze_and_thaw_keep_memory(harness, runtime, counter_sandbox):
    assert runtime.freeze(counter_sandbox.id)
    assert runtime.is_frozen(counter_sandbox.id)
    runtime.thaw(counter_sandbox.id)
    assert not runtime.is_frozen(counter_sandbox.id)
    assert get(runtime, counter_sandbox.id) == 4


def test_restore_missing_checkpoint_is_a_clear_error(harness, runtime, tmp_path):
    with pytest.raises(CheckpointInvalid, match="not a Corral checkpoint"):
        harness.run(runtime.restore(tmp_path / "nothing-here", 1, SandboxConfig()))


def test_restore_corrupted_checkpoint_fails_and_leaves_nothing(harness, runtime, store, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(store.resolve("base"), corrupt, symlinks=True)
    image = corrupt / "image" / "checkpoint.img"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    before = set(s.id for s in runtime.list())
    dirs_before = set((runtime.sandboxes_dir).iterdir())
    with pytest.raises(SandboxFailed, match="restoring checkpoint failed"):
        harness.run(runtime.restore(corrupt, 1, SandboxConfig()))
    assert set(s.id for s in runtime.list()) == before
    assert set(runtime.sandboxes_dir.iterdir()) == dirs_before


def test_checkpoint_into_non_empty_directory_is_refused(harness, runtime, sandbox_factory, tmp_path):
    sb = sandbox_factory()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(CheckpointInvalid, match="not empty"):
        harness.run(runtime.checkpoint(sb.id, tmp_path / "busy"))
    assert runsc_status(harness, runtime, sb.id) == "running"


def test_full_disk_during_checkpoint_leaves_source_running_and_nothing_visible(harness, runtime, counter_sandbox,
                                                                               tmp_path):
    from corral.runtime.base import InsufficientResources

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "corral-test-full", str(small)], check=True)
    try:
        with pytest.raises(InsufficientResources, match="no space left"):
            harness.run(runtime.checkpoint(counter_sandbox.id, small / "ckpt"))
        assert list(small.iterdir()) == []  # no partial checkpoint, not even its staging directory
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert runsc_status(harness, runtime, counter_sandbox.id) == "running"
    assert get(runtime, counter_sandbox.id) == 4  # the source keeps running, not frozen


def test_restore_refused_when_memory_is_short(harness, runtime, counter_sandbox, tmp_path):
    from dataclasses import replace

    from corral.runtime.base import InsufficientResources

    ckpt = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "ckpt"))
    before = {s.id for s in runtime.list()}
    settings = runtime.settings
    runtime.settings = replace(settings, memory_reserve_mb=10_000_000)
    try:
        with pytest.raises(InsufficientResources, match="needs about"):
            harness.run(runtime.restore(ckpt.path, 1, SandboxConfig()))
    finally:
        runtime.settings = settings
    assert {s.id for s in runtime.list()} == before
    (clone,) = harness.run(runtime.restore(ckpt.path, 1, SandboxConfig()))  # the checkpoint is intact
    assert get(runtime, clone.id) == 4
    harness.run(runtime.destroy(clone.id))


def test_filesystem_only_checkpoint_cold_boots_with_the_files(harness, runtime, counter_sandbox, tmp_path):
    harness.run(runtime.exec(counter_sandbox.id, ["sh", "-c", "echo kept > /home/user/fs.txt"]))
    ckpt = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "fs", memory=False))
    assert not (ckpt.path / "image").exists()
    (clone,) = harness.run(runtime.restore(ckpt.path, 1, SandboxConfig()))
    try:
        # Booted again: the counter starts from 1, the files are there.
        assert get(runtime, clone.id) == 1
        out = harness.run(runtime.exec(clone.id, ["cat", "/home/user/fs.txt", "/home/user/pre.txt"]))
        assert out.stdout == b"kept\nbefore\n"
    finally:
        harness.run(runtime.destroy(clone.id))
    # A memory checkpoint can be cold-booted too, on request.
    full = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "full"))
    (cold,) = harness.run(runtime.restore(full.path, 1, SandboxConfig(), memory=False))
    try:
        assert get(runtime, cold.id) == 1
    finally:
        harness.run(runtime.destroy(cold.id))


def test_a_prepared_container_is_used_once_and_discarded_without_leftovers(harness, runtime, settings,
                                                                           counter_sandbox, tmp_path):
    from helpers.leaks import footprint

    from corral.runtime.base import Resources

    target = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "paused", leave_running=False))
    before = footprint(settings)
    prepared = harness.run(runtime.prepare(target, Resources()))
    assert runtime.prepared() == [prepared]
    held = footprint(settings)
    assert (held.containers, held.netns) == (before.containers + 1, before.netns + 1)
    clone = harness.run(runtime.start(prepared, SandboxConfig()))
    assert runtime.prepared() == []  # the start took it
    assert get(runtime, clone.id) == 4  # and it is the checkpointed process, going on
    with pytest.raises(SandboxFailed, match="not prepared"):
        harness.run(runtime.start(prepared, SandboxConfig()))  # a handle starts once
    harness.run(runtime.destroy(clone.id))
    again = harness.run(runtime.prepare(target, Resources()))
    harness.run(runtime.discard(again))
    harness.run(runtime.discard(again))  # idempotent
    assert runtime.prepared() == []
    assert footprint(settings) == before
    with pytest.raises(CheckpointInvalid):
        runtime.open_snapshot(tmp_path / "missing")
    assert footprint(settings) == before


def _capacity(runtime, store, **knobs):
    from corral.orchestrator.capacity import Capacity
    from corral.orchestrator.envd_link import EnvdLink

    return Capacity(runtime, EnvdLink(), lambda t: runtime.open_snapshot(store.resolve(t)), **knobs)


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


def test_resume_hold_keeps_a_prepared_container_for_its_time_then_releases(harness, runtime, settings, store,
                                                                          counter_sandbox, tmp_path):
    from helpers.leaks import footprint

    from corral.runtime.base import Resources

    target = harness.run(runtime.checkpoint(counter_sandbox.id, tmp_path / "paused", leave_running=False))
    shutil.copytree(target.path, tmp_path / "paused-too", symlinks=True)
    second = runtime.open_snapshot(tmp_path / "paused-too")
    before = footprint(settings)

    async def scenario() -> None:
        capacity = _capacity(runtime, store, resume_keep_s=2.0, resume_most=1)
        capacity.hold_for_resume(target, Resources())
        await capacity.settled(target)
        assert (capacity.resume_ready(), capacity.prepared(target)) == (1, 1)
        # One held at most: holding a second releases the first.
        capacity.hold_for_resume(second, Resources())
        await _until(lambda: capacity.prepared(target) == 0 and capacity.prepared(second) == 1)
        assert capacity.resume_ready() == 1
        # Released by itself after keep_s.
        await _until(lambda: capacity.prepared(second) == 0)
        assert capacity.resume_ready() == 0
        await capacity.close()

    harness.run(scenario())
    assert footprint(settings) == before


def test_small_layer_is_replayed_into_a_templates_prepared_container(harness, runtime, settings, store, tmp_path):
    from helpers.leaks import footprint

    from corral.runtime.base import ContainerState

    capacity = _capacity(runtime, store, prepared_size=1)
    template = runtime.open_snapshot(store.resolve("base"))

    async def start(snapshot, **kw):
        return await capacity.start(snapshot, SandboxConfig(), **kw)

    def wait_prepared() -> None:
        harness.run(_until(lambda: capacity.prepared(template) == 1))

    harness.run(_open(capacity))
    source = harness.run(start(template, stock=True))
    made = [source.id]
    try:
        wait_prepared()
        before = footprint(settings)
        script = ("echo forked > /home/user/note.txt && rm /etc/debian_version && echo t > /tmp/in-tmp && "
                  "rm -rf /opt/corral-none && mkdir -p /srv/new/dir && ln -s /home/user/note.txt /srv/link")
        assert harness.run(runtime.exec(source.id, ["sh", "-c", script])).exit_code == 0
        small = harness.run(runtime.checkpoint(source.id, tmp_path / "small", leave_running=True))
        clone = harness.run(start(small))
        made.append(clone.id)
        # Replayed, not stacked: the clone does not stand on the checkpoint's layer.
        assert small.path not in runtime.in_use()
        check = ("cat /home/user/note.txt /tmp/in-tmp /srv/link; test -e /etc/debian_version || echo deleted; "
                 "test -d /srv/new/dir && echo dir")
        result = harness.run(runtime.exec(clone.id, ["sh", "-c", check]))
        assert result.stdout.decode() == "forked\nt\nforked\ndeleted\ndir\n"
        host, port = runtime.address(clone.id, 49983)
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10) as response:
            assert response.status == 204  # envd came back from the memory image
        # A layer above the replay limit is stacked as before.
        assert harness.run(runtime.exec(source.id, ["sh", "-c", "head -c 2000000 /dev/urandom > /home/user/big"]
                                        )).exit_code == 0
        wait_prepared()
        big = harness.run(runtime.checkpoint(source.id, tmp_path / "big", leave_running=True))
        stacked = harness.run(start(big))
        made.append(stacked.id)
        assert big.path in runtime.in_use()
        assert capacity.prepared(template) == 1  # left for the next one
        size = harness.run(runtime.exec(stacked.id, ["stat", "-c", "%s", "/home/user/big"])).stdout
        assert size.decode().strip() == "2000000"
        for sid in made[1:]:
            harness.run(runtime.destroy(sid))
        del made[1:]
        wait_prepared()
        assert footprint(settings) == before  # the clones are gone and one container is prepared again
    finally:
        for sid in made:
            if runtime.state(sid) is ContainerState.LIVE:
                harness.run(runtime.destroy(sid))
        harness.run(capacity.close())


async def _open(capacity) -> None:
    capacity.open()  # its refill scheduler runs on the harness's loop
