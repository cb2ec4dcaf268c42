"""Nothing leaks: destroy frees everything, and a runtime killed with SIGKILL is cleaned up or adopted by
the next one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TEST_ROOT, make_settings
from helpers.leaks import empty, footprint

from corral.envd import DEFAULT_PORT as ENVD_PORT
from corral.network.connections import open_connections_to
from corral.runtime.base import Resources, SandboxConfig


def test_destroy_leaves_nothing(harness, runtime, settings, sandbox_factory):
    before = footprint(settings)
    sb = sandbox_factory(SandboxConfig(internet=False))
    during = footprint(settings)
    assert during.containers == before.containers + 1
    assert during.netns == before.netns + 1
    harness.run(runtime.destroy(sb.id))
    assert footprint(settings) == before
    from corral.network.firewall import offline_addresses
    assert str(runtime.slots.claim(0).gateway) not in offline_addresses(settings.instance)


def test_destroy_aborts_the_hosts_connections_into_the_sandbox(harness, runtime, sandbox_factory):
    """A connection still open when its sandbox goes away must not outlive it: the next sandbox on the same
    address would count it as its own (a checkpoint waits for such connections to close)."""
    sb = sandbox_factory(SandboxConfig())
    host, port = runtime.address(sb.id, ENVD_PORT)
    held = socket.create_connection((host, port), timeout=5)
    try:
        assert open_connections_to(host) == 1
        harness.run(runtime.destroy(sb.id))
        assert open_connections_to(host) == 0
        with pytest.raises(OSError):  # aborted: the kernel reports it to the socket's owner
            held.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        held.close()


def test_create_with_unknown_template_is_refused(harness, runtime, settings):
    from corral.runtime.base import TemplateNotFound

    before = footprint(settings)
    with pytest.raises(TemplateNotFound, match="not found"):
        harness.run(runtime.create("no-such-template", SandboxConfig()))
    assert footprint(settings) == before


@pytest.mark.parametrize("resources, message", [
    (Resources(vcpus=64), "vCPUs"),
    (Resources(memory_mb=10**8), "memory"),
    (Resources(disk_mb=10**10), "disk"),
])
def test_resources_above_host_capacity_are_refused(harness, runtime, settings, resources, message):
    from corral.runtime.base import InsufficientResources, InvalidRequest

    before = footprint(settings)
    with pytest.raises((InsufficientResources, InvalidRequest), match=message):
        harness.run(runtime.create("base", SandboxConfig(resources=resources)))
    assert footprint(settings) == before


CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from conftest import make_settings, template_runtime
    from corral.templates.store import TemplateStore
    from corral.runtime.base import Resources, SandboxConfig

    async def main():
        settings = make_settings("t2", "10.203.0.0/24")
        store = TemplateStore(settings)
        rt = template_runtime(settings, store)
        await rt.open()
        a = await rt.create("base", SandboxConfig())
        b = await rt.create("base", SandboxConfig(internet=False))
        await rt.runsc.pause(a.id)  # as during a checkpoint, when the process dies before resuming it
        rt.freeze(b.id)  # frozen by the idle policy
        await rt.prepare(rt.open_snapshot(store.resolve("base")), Resources())  # a prepared container
        print(a.id, b.id, flush=True)
        while True:  # keeps preparing containers until the parent kills us
            await rt.prepare(rt.open_snapshot(store.resolve("base")), Resources())

    asyncio.run(main())
""")


def test_kill_9_then_restart_adopts_running_sandboxes_and_removes_the_rest(harness, runtime):
    settings = make_settings("t2", "10.203.0.0/24")
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent))],
                             stdout=subprocess.PIPE, text=True)
    try:
        ids = child.stdout.readline().split()
        assert len(ids) == 2, "child runtime did not create its sandboxes"
        harness.run(__import__("asyncio").sleep(0.3))  # let the pool be mid-way through a prepare
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    left = footprint(settings)
    assert left.containers >= 2  # the two sandboxes plus whatever the pool had made

    from corral.network.firewall import offline_addresses
    from corral.runtime.base import ContainerState
    from corral.runtime.gvisor import GVisorRuntime

    again = GVisorRuntime(settings)
    harness.run(again.open())
    try:
        assert sorted(s.id for s in again.list()) == sorted(ids)
        adopted = footprint(settings)
        assert (adopted.containers, adopted.netns, adopted.sandbox_dirs) == (2, 2, 2)
        assert again.prepared() == []  # prepared containers are not adopted
        # The one a checkpoint had stopped runs again, and so does the frozen one.
        assert [again.state(sid) for sid in ids] == [ContainerState.LIVE, ContainerState.LIVE]
        assert not again.is_frozen(ids[1])
        for sid in ids:
            r = harness.run(again.exec(sid, ["echo", "still here"]))
            assert r.stdout == b"still here\n"
        offline = next(s for s in again.list() if s.id == ids[1])
        assert offline.address in offline_addresses(settings.instance)
    finally:
        harness.run(again.destroy_all())
    assert empty(footprint(settings)), footprint(settings)
    import shutil
    shutil.rmtree(TEST_ROOT / "t2", ignore_errors=True)
    shutil.rmtree(settings.run_dir, ignore_errors=True)


def test_restart_kills_what_only_a_stale_cgroup_still_knows(harness):
    """A `runsc create` killed half-way leaves a gVisor sandbox and gofer that runsc has no state for; the
    next runtime finds them by their cgroup and kills them."""
    import shutil

    from corral.runtime.gvisor import GVisorRuntime

    settings = make_settings("t2", "10.203.0.0/24")
    cgroup = Path("/sys/fs/cgroup/pids") / f"corral-{settings.instance}" / "iorphanxxxxxxxxxxxxx"
    cgroup.mkdir(parents=True, exist_ok=True)
    orphan = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        (cgroup / "cgroup.procs").write_text(str(orphan.pid))
        runtime = GVisorRuntime(settings)
        harness.run(runtime.open())
        harness.run(runtime.destroy_all())
        # Killed and reaped (by the runtime, which is this process: Popen then reads no status).
        assert orphan.poll() is not None and not Path(f"/proc/{orphan.pid}").exists()
        assert not cgroup.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        with __import__("contextlib").suppress(OSError):
            cgroup.rmdir()
        shutil.rmtree(TEST_ROOT / "t2", ignore_errors=True)
        shutil.rmtree(settings.run_dir, ignore_errors=True)
