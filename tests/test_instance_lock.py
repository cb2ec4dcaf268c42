"""One process owns an instance: a second runtime is refused, and the CLI commands that need a runtime run
beside the owner as a side instance without touching the owner's sandboxes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from corral.runtime.base import InstanceBusy

CLI = [sys.executable, "-c", "from corral.cli.main import app; app()"]


def test_a_second_runtime_on_a_taken_instance_is_refused_and_names_the_owner(harness, runtime, settings,
                                                                             sandbox_factory):
    from corral.runtime.gvisor import GVisorRuntime

    sb = sandbox_factory()
    second = GVisorRuntime(settings)
    with pytest.raises(InstanceBusy, match=f"in use by process {os.getpid()}"):
        harness.run(second.open())
    # It reconciled nothing: the owner's sandbox runs on.
    assert harness.run(runtime.exec(sb.id, ["echo", "alive"])).stdout == b"alive\n"


def test_sandbox_run_beside_the_owner_runs_as_a_side_instance(harness, runtime, settings, sandbox_factory):
    sb = sandbox_factory()
    env = {**os.environ, "CORRAL_INSTANCE": settings.instance, "CORRAL_DATA_DIR": str(settings.data_dir),
           "CORRAL_RUN_DIR": str(settings.run_dir), "CORRAL_SANDBOX_NETWORK": str(settings.sandbox_network)}
    done = subprocess.run([*CLI, "sandbox", "run", "base", "--", "echo from the side"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the side\n"
    assert f"instance {settings.instance!r} is owned by process {os.getpid()}" in done.stderr
    assert "running as side instance 's0'" in done.stderr
    # The owner's sandbox and containers are untouched, and the side instance left nothing behind.
    assert sb.id in {s.id for s in runtime.list()}
    assert harness.run(runtime.exec(sb.id, ["echo", "alive"])).stdout == b"alive\n"
    assert not (settings.data_dir / "side" / "s0").exists()
    assert not any(n.startswith("corral-s0-") for n in os.listdir("/run/netns"))


def test_the_lock_is_released_on_close(harness, tmp_path):
    from corral.runtime.gvisor.host import InstanceLock

    first, second = InstanceLock("lk", tmp_path), InstanceLock("lk", tmp_path)
    first.acquire()
    assert second.held_by_other()
    with pytest.raises(InstanceBusy):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
