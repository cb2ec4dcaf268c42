"""Shared fixtures: one real gVisor runtime for the session, on its own instance tag, data directories
and sandbox network, so the suite never touches a real installation's sandboxes on the same host."""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers.testnet import TestHost

TEST_ROOT = Path("/var/tmp/corral-test")
# scripts/test.sh runs test modules on two pytest-xdist workers at once. Each module has its own instance and
# sandbox network; what a session shares (the runtime tests drive directly, the DNS host) is one per worker.
PARALLEL = "PYTEST_XDIST_WORKER" in os.environ  # without workers there is nothing to take turns with
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
WORKER_INSTANCES = (("t1", "10.202.0.0/22"), ("t29", "10.242.0.0/22"))
DNS_HOST_ADDRESS = f"10.98.{WORKER}.53"
DNS_ANSWER = "203.0.113.80"
# Modules that must not run at once on two workers: test hosts on one /24 (their veths' host ends and
# routes would clash), and servers on the host's port 443. Each takes its group's lock for its whole run.
SERIAL_GROUPS = {
    "test-hosts": ("test_network.py", "test_egress_sdk.py", "test_base_image_sdk.py"),
    "https-443": ("test_public_urls_sdk.py", "test_mcp_gateway_sdk.py"),
}
GROUP_OF = {module: group for group, modules in SERIAL_GROUPS.items() for module in modules}
# The longest modules (a few minutes each), handed out first so that the two workers end close together.
LONGEST_FIRST = ("test_desktop_sdk.py", "test_templates_sdk.py", "test_desktop_recordings.py",
                 "test_template_images_sdk.py", "test_mcp_gateway_sdk.py", "test_interpreter_sdk.py",
                 "test_platform_sdk.py")


@pytest.fixture(scope="module", autouse=True)
def serial_group(request):
    """The module's SERIAL_GROUPS lock (an flock the kernel drops with a killed worker), held while it runs."""
    group = GROUP_OF.get(request.path.name)
    if group is None or not PARALLEL:
        yield None
        return
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    with open(TEST_ROOT / f".{group}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield group


@pytest.fixture(autouse=True)
def host_share(request):
    """Tests marked `alone` run while no test runs on the other worker; the others share the host. A
    turnstile keeps an `alone` test from waiting forever behind the other worker's tests in a row: once it
    queues, no new test starts until it has run."""
    if not PARALLEL:
        yield
        return
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    alone = request.node.get_closest_marker("alone") is not None
    with open(TEST_ROOT / ".turnstile.lock", "w") as turnstile, open(TEST_ROOT / ".share.lock", "w") as share:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if alone:
            fcntl.flock(share, fcntl.LOCK_EX)
        else:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            fcntl.flock(share, fcntl.LOCK_SH)
        yield


def pytest_collection_modifyitems(config, items):
    """The longest modules go first; within a module the order stays."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_finish(session):
    # tests/test_fast_*.py run on corral.runtime.fake and need neither root nor runsc
    # (`pytest tests/test_fast_*.py`); every other test does.
    if all(item.path.name.startswith("test_fast_") for item in session.items):
        return
    if os.geteuid() != 0:
        pytest.exit("the test suite drives runsc, netns, nftables and mounts: run it as root "
                    "(sudo scripts/test.sh), or only the fast tests: pytest tests/test_fast_*.py", returncode=2)
    if shutil.which("runsc") is None:
        pytest.exit("runsc is not installed: run sudo scripts/install.sh", returncode=2)


def make_settings(instance: str, network: str):
    from corral.config import Settings

    return Settings(data_dir=TEST_ROOT / instance / "data", run_dir=Path(f"/run/corral-test-{instance}"),
                    sandbox_network=ipaddress.IPv4Network(network), instance=instance)


class Harness:
    """Runs coroutines on one event loop for the whole session."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro, timeout: float = 300):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def harness():
    h = Harness()
    yield h
    h.loop.close()


@pytest.fixture(scope="session")
def dns_host():
    host = TestHost(f"dns{WORKER or ''}", DNS_HOST_ADDRESS).up()
    host.serve_dns(DNS_ANSWER)
    yield host
    host.down()


@pytest.fixture(scope="session")
def settings():
    if WORKER not in range(len(WORKER_INSTANCES)):
        pytest.exit(f"the suite runs on at most {len(WORKER_INSTANCES)} xdist workers", returncode=2)
    return make_settings(*WORKER_INSTANCES[WORKER])


@pytest.fixture(scope="session")
def store(settings):
    from corral.templates.store import TemplateStore

    return TemplateStore(settings)


def template_runtime(settings, store):
    """A gVisor runtime that also starts sandboxes by template name and restores from a snapshot's path:
    what the orchestrator does in production, kept short for tests that drive the runtime directly."""
    from corral.runtime.gvisor import GVisorRuntime

    class TemplateRuntime(GVisorRuntime):
        async def create(self, template, config):
            return (await self.restore(self.open_snapshot(store.resolve(template)), 1, config))[0]

        async def restore(self, snapshot, count, config, *, memory=True):
            if isinstance(snapshot, Path):
                snapshot = self.open_snapshot(snapshot)
            return await super().restore(snapshot, count, config, memory=memory)

    return TemplateRuntime(settings)


@pytest.fixture(scope="session")
def runtime(harness, settings, store, dns_host):
    os.environ["CORRAL_DNS_UPSTREAM"] = DNS_HOST_ADDRESS
    rt = template_runtime(settings, store)
    harness.run(rt.open())
    harness.run(store.build("base", rt), timeout=1800)
    yield rt
    harness.run(rt.destroy_all())
    shutil.rmtree(TEST_ROOT / settings.instance, ignore_errors=True)
    shutil.rmtree(settings.run_dir, ignore_errors=True)


@pytest.fixture
def sandbox_factory(harness, runtime):
    """Creates sandboxes from `base` and destroys whatever the test left running."""
    from corral.runtime.base import SandboxConfig

    made = []

    def make(config: SandboxConfig | None = None):
        sb = harness.run(runtime.create("base", config or SandboxConfig()))
        made.append(sb.id)
        return sb

    yield make
    for sid in made:
        if sid in {s.id for s in runtime.list()}:
            harness.run(runtime.destroy(sid))


def sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)
