"""The idle policy through a real `corral serve` and the unmodified e2b SDK: idle sandboxes are frozen
(no CPU), breathe now and then so background timers still run, and any request thaws them at once."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t6", "10.215.0.0/22"
IDLE_S, FRESH_S, BREATHE_S = 3.0, 0.5, 3.0
FREEZER = Path("/sys/fs/cgroup/freezer") / f"corral-{INSTANCE}"


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_IDLE_FREEZE_S": str(IDLE_S), "CORRAL_IDLE_FRESH_S": str(FRESH_S),
                                    "CORRAL_IDLE_BREATHE_S": str(BREATHE_S)})
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def opts(server):
    key = server.cli("keys", "create", "--name", "idle").strip()
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def freezer_state(runtime_id: str) -> str:
    if not FREEZER.is_dir():
        pytest.skip("no cgroup v1 freezer hierarchy on this host to observe freezing from outside")
    return (FREEZER / runtime_id / "freezer.state").read_text().strip()


def wait_for_state(runtime_id: str, wanted: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if freezer_state(runtime_id) == wanted:
            return True
        time.sleep(0.05)
    return False


def runtime_ids(server: ServerProcess) -> set[str]:
    """Sandboxes that run (created-only containers the runtime keeps prepared have no record yet)."""
    return {p.parent.name for p in (Path(server.env["CORRAL_DATA_DIR"]) / "sandboxes").glob("*/record.json")}


def test_pooled_sandboxes_wait_frozen(server, opts):
    pooled = runtime_ids(server)
    assert pooled and all(freezer_state(rid) == "FROZEN" for rid in pooled)
    sbx = Sandbox.create(timeout=120, **opts)  # the claim thaws it
    try:
        assert sbx.sandbox_id in pooled
        assert sbx.commands.run("echo claimed").stdout == "claimed\n"
    finally:
        sbx.kill()


def test_idle_sandbox_freezes_breathes_and_thaws_on_request(server, opts):
    sbx = Sandbox.create(timeout=300, **opts)
    try:
        # A background ticker that is not attached to any request.
        sbx.commands.run("nohup sh -c 'while true; do date +%s.%N >> /tmp/ticks; sleep 0.5; done' "
                         ">/dev/null 2>&1 &")
        assert wait_for_state(sbx.sandbox_id, "FROZEN"), "an idle sandbox was not frozen"
        frozen_at = time.monotonic()
        time.sleep(4 * BREATHE_S)
        elapsed = time.monotonic() - frozen_at
        # Thawed by this request (it must not wait for the next breath).
        ticks = [float(t) for t in sbx.commands.run("cat /tmp/ticks").stdout.split()]
        assert freezer_state(sbx.sandbox_id) == "THAWED"
        recent = [t for t in ticks if t >= ticks[-1] - elapsed]
        # Awake all along it would have ticked ~2/s; frozen with a 1 s breath every 3 s it ticks far less,
        # but it does tick: timers still fire while the sandbox is idle.
        assert 0 < len(recent) < 2 * elapsed * 0.7, (len(recent), elapsed)
    finally:
        sbx.kill()


def test_a_sandbox_nobody_has_used_yet_freezes_sooner(server, opts):
    fresh = Sandbox.create(timeout=120, **opts)
    used = Sandbox.create(timeout=120, **opts)
    try:
        used.commands.run("true")
        assert wait_for_state(fresh.sandbox_id, "FROZEN", timeout=IDLE_S - 1), "an unused sandbox was not frozen"
        assert freezer_state(used.sandbox_id) == "THAWED"  # used within the idle time: left awake
        assert wait_for_state(used.sandbox_id, "FROZEN")  # until it is idle for the whole idle time
        assert fresh.commands.run("echo thawed").stdout == "thawed\n"  # the first request thaws it
        assert freezer_state(fresh.sandbox_id) == "THAWED"
    finally:
        fresh.kill()
        used.kill()


def test_asking_the_api_about_an_unused_sandbox_gives_it_the_whole_idle_time(server, opts):
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        assert wait_for_state(sbx.sandbox_id, "FROZEN", timeout=IDLE_S - 1)
        assert sbx.get_info().sandbox_id == sbx.sandbox_id  # its owner is interested: thawed, and awake...
        assert freezer_state(sbx.sandbox_id) == "THAWED"
        time.sleep(FRESH_S + 1)
        assert freezer_state(sbx.sandbox_id) == "THAWED"  # ...for longer than the rule for unused ones
        assert wait_for_state(sbx.sandbox_id, "FROZEN")
        sbx.get_info()  # no longer unused: asking the API changes nothing now
        time.sleep(0.2)
        assert freezer_state(sbx.sandbox_id) == "FROZEN"
    finally:
        sbx.kill()


def test_open_request_keeps_the_sandbox_awake(server, opts):
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        states: list[str] = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                states.append(freezer_state(sbx.sandbox_id))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = sbx.commands.run("sleep 4 && echo finished", timeout=30)
        finally:
            done.set()
            watcher.join()
        assert result.stdout == "finished\n"
        assert states and "FROZEN" not in states
    finally:
        sbx.kill()


def test_frozen_sandbox_pauses_resumes_and_survives_a_server_crash(server, opts):
    sbx = Sandbox.create(timeout=300, **opts)
    try:
        sbx.files.write("/home/user/kept.txt", "still here")
        assert wait_for_state(sbx.sandbox_id, "FROZEN")
        sbx.pause()  # the checkpoint needs it running: the runtime thaws it first
        resumed = Sandbox.connect(sbx.sandbox_id, **opts)
        assert resumed.files.read("/home/user/kept.txt") == "still here"
        # Frozen again, then the server dies without cleaning up: the restarted one must thaw it.
        frozen = [rid for rid in runtime_ids(server) if wait_for_state(rid, "FROZEN", timeout=10)]
        assert frozen
        server.stop(signal.SIGKILL)
        server.start(wait_pool=1)
        assert resumed.commands.run("cat /home/user/kept.txt").stdout == "still here"
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)
