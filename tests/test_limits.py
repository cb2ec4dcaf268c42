"""Resource limits: disk quota, process count, memory and CPU are enforced without harming the host or
other sandboxes."""

from __future__ import annotations

import os

import httpx

from corral.runtime.base import Resources, SandboxConfig


def test_writing_past_disk_quota_gives_enospc_and_host_file_stays_bounded(harness, runtime, sandbox_factory):
    sb = sandbox_factory(SandboxConfig(resources=Resources(disk_mb=128)))
    r = harness.run(runtime.exec(sb.id, ["sh", "-c", "dd if=/dev/zero of=/home/user/fill bs=1M count=400"],
                                 timeout=120))
    assert r.exit_code != 0
    assert b"No space left on device" in r.stderr
    image = runtime.table.get(sb.id).disk_image
    assert os.stat(image).st_blocks * 512 <= 128 * 1024 * 1024
    stats = harness.run(runtime.stats(sb.id))
    assert stats.disk_total_bytes <= 128 * 1024 * 1024
    assert stats.disk_used_bytes > 100 * 1024 * 1024


def test_fork_bomb_is_stopped_at_pids_limit(harness, runtime, sandbox_factory):
    sb = sandbox_factory(SandboxConfig(resources=Resources(pids=48)))
    bomb = (
        "import os, time, errno\n"
        "n = 0\n"
        "try:\n"
        "    while n < 1000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, errno.errorcode[e.errno])\n"
    )
    r = harness.run(runtime.exec(sb.id, ["python3", "-c", bomb], user="user", timeout=120))
    forked, err = r.stdout.decode().split()
    assert err == "EAGAIN"
    assert int(forked) < 48
    harness.run(runtime.exec(sb.id, ["pkill", "-u", "user", "python3"]))
    alive = harness.run(runtime.exec(sb.id, ["echo", "alive"]))
    assert alive.stdout == b"alive\n"


def test_memory_hog_is_killed_inside_and_the_sandbox_and_neighbours_live_on(harness, runtime, sandbox_factory):
    """gVisor has no OOM killer; envd's guard kills the biggest process before the host's cgroup limit
    would take the whole sandbox down."""
    neighbour = sandbox_factory()
    hog = sandbox_factory(SandboxConfig(resources=Resources(memory_mb=128)))
    harness.run(runtime.exec(hog.id, ["sh", "-c", "nohup sleep 600 >/dev/null 2>&1 &"]))
    for program in ("x = bytearray(1024 * 1024 * 1024); print('no limit')",  # one big allocation
                    "x = []\nwhile True: x.append(bytearray(8 * 1024 * 1024))"):  # growing
        r = harness.run(runtime.exec(hog.id, ["python3", "-c", program], timeout=120))
        assert b"no limit" not in r.stdout
        assert r.exit_code == 128 + 9, (r.exit_code, r.stderr[-300:])  # SIGKILL
    # The sandbox survived both, with its other processes, and can use its memory again.
    assert harness.run(runtime.exec(hog.id, ["pgrep", "-x", "sleep"])).exit_code == 0
    again = harness.run(runtime.exec(hog.id, ["python3", "-c", "print(len(bytearray(64 * 1024 * 1024)))"]))
    assert again.stdout.strip() == str(64 * 1024 * 1024).encode()
    ok = harness.run(runtime.exec(neighbour.id, ["python3", "-c", "print(len(bytearray(200 * 1024 * 1024)))"]))
    assert ok.stdout.strip() == str(200 * 1024 * 1024).encode()
    # envd reports the kills (the control plane turns them into sandbox.out_of_memory events); a new /init
    # (the start of another identity: a resume, a fork) counts from none.
    envd = f"http://{hog.address}:49983"
    reported = httpx.get(f"{envd}/metrics", timeout=20).json()
    assert reported["oom_kills"] == 2 and reported["oom_last"]["command"].startswith("python3")
    assert httpx.post(f"{envd}/init", json={}, timeout=20).status_code == 204
    assert httpx.get(f"{envd}/metrics", timeout=20).json()["oom_kills"] == 0


def test_memory_limit_is_what_the_sandbox_sees(harness, runtime, sandbox_factory):
    sb = sandbox_factory(SandboxConfig(resources=Resources(memory_mb=256)))
    r = harness.run(runtime.exec(sb.id, ["head", "-1", "/proc/meminfo"]))
    total_kb = int(r.stdout.split()[1])
    assert 256 * 1024 <= total_kb < 1024 * 1024


def test_cpu_quota_caps_cpu_time(harness, runtime, sandbox_factory):
    sb = sandbox_factory(SandboxConfig(resources=Resources(vcpus=0.5)))
    before = harness.run(runtime.stats(sb.id)).cpu_seconds
    burn = "import time, threading\nend = time.time() + 3\n" \
           "def spin():\n    while time.time() < end: pass\n" \
           "ts = [threading.Thread(target=spin) for _ in range(2)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
    harness.run(runtime.exec(sb.id, ["python3", "-c", burn], timeout=60))
    used = harness.run(runtime.stats(sb.id)).cpu_seconds - before
    # 3 s of wall time at 0.5 cores is 1.5 s of CPU; unlimited it would approach 6 s on 2 cores.
    assert 0.5 < used < 2.5


def test_low_priority_sandbox_yields_cpu_until_raised(runtime, sandbox_factory):
    """Warm-pool sandboxes restore with the lowest CPU weight; a claim gives them the normal one."""
    from pathlib import Path

    sb = sandbox_factory(SandboxConfig(low_priority=True))
    relative = f"{runtime.cgroup_parent.lstrip('/')}/{sb.id}"
    shares = Path("/sys/fs/cgroup/cpu") / relative / "cpu.shares"
    weight = Path("/sys/fs/cgroup") / relative / "cpu.weight"
    knob, low, normal = (shares, "2", "1024") if shares.exists() else (weight, "1", "100")
    assert knob.read_text().strip() == low
    runtime.raise_priority(sb.id)
    assert knob.read_text().strip() == normal


def test_frozen_sandbox_uses_no_cpu_and_thaws_for_what_needs_it(harness, runtime, sandbox_factory):
    """freeze() stops the sandbox's host processes (gVisor's kernel too: `runsc pause` would leave it
    burning); stats answer without waking it; exec, checkpoint and destroy thaw it first."""
    import time

    sb = sandbox_factory()
    idle_before = runtime.host_cpu_seconds(sb.id)
    time.sleep(2)
    idle_burn = runtime.host_cpu_seconds(sb.id) - idle_before
    assert runtime.freeze(sb.id) and runtime.is_frozen(sb.id)
    time.sleep(0.3)  # FREEZING -> FROZEN
    before = runtime.host_cpu_seconds(sb.id)
    time.sleep(2)
    frozen_burn = runtime.host_cpu_seconds(sb.id) - before
    assert frozen_burn < 0.002 < idle_burn, (frozen_burn, idle_burn)
    assert harness.run(runtime.stats(sb.id)).disk_total_bytes > 0
    assert harness.run(runtime.exec(sb.id, ["echo", "awake"])).stdout == b"awake\n"
    assert not runtime.is_frozen(sb.id)
    assert runtime.freeze(sb.id)
    harness.run(runtime.destroy(sb.id))
    assert runtime._container_pids(sb.id) == [] and sb.id not in {s.id for s in runtime.list()}
