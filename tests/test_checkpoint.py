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
    layers = [snapshot / "layer", *runtime._box(sb.id).lowers]
    assert not any((layer / "etc" / "corral-marker").exists() for layer in layers)
    assert any((layer / "etc" / "hostname").exists() for layer in layers)


def test_pause_and_resume_keep_memory(harness, runtime, counter_sandbox):
    harness.run(runtime.pause(counter_sandbox.id))
    assert harness.run(runtime.state(counter_sandbox.id)) == "paused"
    harness.run(runtime.resume(counter_sandbox.id))
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
    assert harness.run(runtime.state(sb.id)) == "running"


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
    assert harness.run(runtime.state(counter_sandbox.id)) == "running"
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


def test_a_prepared_restore_is_used_once_and_released_without_leftovers(harness, runtime, settings, counter_sandbox,
                                                                        tmp_path):
    from helpers.leaks import footprint

    from corral.runtime.base import Resources

    target = tmp_path / "paused"
    harness.run(runtime.checkpoint(counter_sandbox.id, target, leave_running=False))
    before = footprint(settings)
    assert harness.run(runtime.prepare_restore(target, Resources())) is True
    assert runtime.prepared(target) == 1
    held = footprint(settings)
    assert (held.containers, held.netns) == (before.containers + 1, before.netns + 1)
    (clone,) = harness.run(runtime.restore(target, 1, SandboxConfig()))
    assert runtime.prepared(target) == 0  # the restore took it
    assert get(runtime, clone.id) == 4  # and it is the checkpointed process, going on
    harness.run(runtime.destroy(clone.id))
    assert harness.run(runtime.prepare_restore(target, Resources())) is True
    harness.run(runtime.release_prepared(target))
    assert runtime.prepared(target) == 0
    assert footprint(settings) == before
    with pytest.raises(CheckpointInvalid):
        harness.run(runtime.prepare_restore(tmp_path / "missing", Resources()))
    assert footprint(settings) == before


def test_resume_warmth_holds_for_its_time_then_releases(harness, runtime, settings, counter_sandbox, tmp_path):
    from helpers.leaks import footprint

    from corral.orchestrator.resume_warmth import ResumeWarmth
    from corral.runtime.base import Resources

    target, second = tmp_path / "paused", tmp_path / "paused-too"
    harness.run(runtime.checkpoint(counter_sandbox.id, target, leave_running=False))
    shutil.copytree(target, second, symlinks=True)
    before = footprint(settings)

    async def until(condition, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        warmth = ResumeWarmth(runtime, keep_s=2.0, most=1)
        warmth.hold(target, Resources())
        await warmth.settled(target)
        assert (warmth.ready(), runtime.prepared(target)) == (1, 1)
        # One held at most: holding a second releases the first.
        warmth.hold(second, Resources())
        await until(lambda: runtime.prepared(target) == 0 and runtime.prepared(second) == 1)
        assert warmth.ready() == 1
        # Released by itself after keep_s.
        await until(lambda: runtime.prepared(second) == 0)
        assert warmth.ready() == 0
        await warmth.close()

    harness.run(scenario())
    assert footprint(settings) == before


@pytest.fixture
def template_pool(harness, runtime, store):
    """The session runtime keeps no prepared containers; this test's restores of `base` make it keep one."""
    runtime._pool_size = 1
    try:
        yield store.resolve("base")
    finally:
        runtime._pool_size = 0
        harness.run(runtime.close())  # tears down what the pool holds


def _wait_prepared(harness, runtime, checkpoint, count: int) -> None:
    deadline = time.monotonic() + 30
    while runtime.prepared(checkpoint) != count:
        assert time.monotonic() < deadline, f"{runtime.prepared(checkpoint)} prepared, expected {count}"
        harness.run(asyncio.sleep(0.05))  # the pool fills on the harness's loop


def test_small_layer_is_replayed_into_a_templates_prepared_container(harness, runtime, settings, template_pool,
                                                                    tmp_path):
    from helpers.leaks import footprint

    source = harness.run(runtime.create("base", SandboxConfig()))
    made = [source.id]
    try:
        _wait_prepared(harness, runtime, template_pool, 1)
        before = footprint(settings)
        script = ("echo forked > /home/user/note.txt && rm /etc/debian_version && echo t > /tmp/in-tmp && "
                  "rm -rf /opt/corral-none && mkdir -p /srv/new/dir && ln -s /home/user/note.txt /srv/link")
        assert harness.run(runtime.exec(source.id, ["sh", "-c", script])).exit_code == 0
        small = tmp_path / "small"
        harness.run(runtime.checkpoint(source.id, small, leave_running=True))
        (clone,) = harness.run(runtime.restore(small, 1, SandboxConfig()))
        made.append(clone.id)
        # Replayed, not stacked: the clone does not stand on the checkpoint's layer.
        assert small / "layer" not in runtime.layers_in_use()
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
        _wait_prepared(harness, runtime, template_pool, 1)
        big = tmp_path / "big"
        harness.run(runtime.checkpoint(source.id, big, leave_running=True))
        (stacked,) = harness.run(runtime.restore(big, 1, SandboxConfig()))
        made.append(stacked.id)
        assert big / "layer" in runtime.layers_in_use()
        assert runtime.prepared(template_pool) == 1  # left for the next one
        size = harness.run(runtime.exec(stacked.id, ["stat", "-c", "%s", "/home/user/big"])).stdout
        assert size.decode().strip() == "2000000"
        for sid in made[1:]:
            harness.run(runtime.destroy(sid))
        del made[1:]
        _wait_prepared(harness, runtime, template_pool, 1)
        assert footprint(settings) == before  # the clones are gone and the pool is back to one container
    finally:
        for sid in made:
            harness.run(runtime.destroy(sid))
