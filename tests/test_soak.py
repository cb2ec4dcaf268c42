"""Soak: nothing leaks across many create/destroy cycles. Outside the default run (about 15-20 minutes
per 1000 cycles on 2 cores); run with `sudo scripts/test.sh -m soak` (CORRAL_SOAK_CYCLES to change the count)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from helpers.leaks import footprint

from corral.runtime.base import SandboxConfig


def host_counts() -> dict[str, int]:
    procs = len([p for p in os.listdir("/proc") if p.isdigit()])
    fds = len(os.listdir("/proc/self/fd"))
    netns = len(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else 0
    with open("/proc/self/mountinfo") as f:
        mounts = sum(1 for _ in f)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.count("\n")
    return {"processes": procs, "fds": fds, "netns": netns, "mounts": mounts, "loop devices": loops}


def processes() -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line.strip()[:160] for line in out.splitlines() if line.strip()}


def new_processes(before: dict[int, str]) -> list[str]:
    """What appeared since `before` (shown when the count is off, to tell a leak from host noise)."""
    return [line for pid, line in processes().items() if pid not in before]


def assert_back_to(before: dict[str, int], fp_before, before_ps: dict[int, str], settings) -> None:
    """The host and the runtime are as they were when `before` was counted."""
    # The last sandbox's processes come to us as zombies and are reaped every 0.5 s (gvisor.py's reaper).
    time.sleep(1.5)
    after, fp_after = host_counts(), footprint(settings)
    assert fp_after == fp_before
    # Other processes on the host may come and go; allow a little noise there, none elsewhere.
    assert abs(after["processes"] - before["processes"]) <= 5, (before, after, new_processes(before_ps))
    for key in ("fds", "netns", "mounts", "loop devices"):
        assert after[key] == before[key], (key, before, after)


@pytest.mark.soak
@pytest.mark.timeout(7200)  # 1000 cycles take 15-20 minutes on 2 cores
def test_create_destroy_cycles_leak_nothing(harness, runtime, settings):
    cycles = int(os.environ.get("CORRAL_SOAK_CYCLES", "1000"))
    before, fp_before, before_ps = host_counts(), footprint(settings), processes()
    for i in range(cycles):
        sb = harness.run(runtime.create("base", SandboxConfig(internet=i % 2 == 0)))
        harness.run(runtime.destroy(sb.id))
    assert_back_to(before, fp_before, before_ps, settings)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_checkpoint_restore_cycles_leak_nothing(harness, runtime, settings, store, tmp_path):
    """Forks the way the server does them: checkpoints of a running sandbox (its resume in the background),
    clones that replay the small layer into the template's pre-created container, resumes prepared and
    released. Nothing may be left afterwards."""
    import asyncio
    import shutil

    from corral.orchestrator.capacity import Capacity
    from corral.orchestrator.envd_link import EnvdLink
    from corral.runtime.base import Resources

    cycles = int(os.environ.get("CORRAL_SOAK_BRANCH_CYCLES", "100"))
    template = runtime.open_snapshot(store.resolve("base"))
    capacity = Capacity(runtime, EnvdLink(), lambda t: template, prepared_size=1, resume_keep_s=60)
    harness.run(_open(capacity))

    def wait_prepared(count: int) -> None:
        deadline = time.monotonic() + 60
        while capacity.prepared(template) != count:
            assert time.monotonic() < deadline
            harness.run(asyncio.sleep(0.05))

    source = harness.run(capacity.start(template, SandboxConfig(), stock=True))
    try:
        wait_prepared(1)
        before, fp_before, before_ps = host_counts(), footprint(settings), processes()
        for i in range(cycles):
            directory = tmp_path / f"c{i}"
            wait_prepared(1)  # refilled after the last cycle took it
            harness.run(runtime.exec(source.id, ["sh", "-c", f"echo {i} > /home/user/step"]))
            snapshot = harness.run(runtime.checkpoint(source.id, directory, leave_running=True))
            clone = harness.run(capacity.start(snapshot, SandboxConfig()))
            assert directory not in runtime.in_use()  # replayed, not stacked
            assert harness.run(runtime.exec(clone.id, ["cat", "/home/user/step"])).stdout == f"{i}\n".encode()
            if i % 2:
                capacity.hold_for_resume(snapshot, Resources())
                harness.run(capacity.settled(snapshot))
                harness.run(capacity.release(directory))
            harness.run(runtime.destroy(clone.id))
            shutil.rmtree(directory)
        wait_prepared(1)
        assert_back_to(before, fp_before, before_ps, settings)
    finally:
        harness.run(runtime.destroy(source.id))
        harness.run(capacity.close())


async def _open(capacity) -> None:
    capacity.open()  # its refill scheduler runs on the harness's loop
