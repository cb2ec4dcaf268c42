"""Sandboxes as the API sees them (the control plane: sandboxes, branching) on the fake runtime and a SQLite
file, no root: kills, timeouts, pauses, resumes, forks and restarts, and that nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers.fast import TEMPLATE, fake_orchestrator, until

from corral.config import PlatformSettings
from corral.control.db import open_database
from corral.control.errors import ApiError
from corral.control.keys import ApiKeys
from corral.control.plane import ControlPlane
from corral.orchestrator import capacity
from corral.orchestrator.sandboxes import Orchestrator
from corral.runtime.base import ContainerState, SandboxFailed
from corral.runtime.fake import FakeEnvd

pytestmark = pytest.mark.anyio

LIVE = ContainerState.LIVE


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_refills(monkeypatch):
    monkeypatch.setattr(capacity, "REFILL_DELAY_S", 0.01)


def platform_settings() -> PlatformSettings:
    return PlatformSettings(database_url="", pool_size=0, pool_templates=(), prepared_pool_size=0,
                            resume_warm_s=60, resume_warm_max=4, max_timeout_s=0, metrics_interval_s=3600,
                            metrics_kept=10, idle_freeze_s=0, idle_fresh_s=0, idle_breathe_every_s=10)


def control_plane(database, orchestrator, tmp_path) -> ControlPlane:
    return ControlPlane(database, orchestrator, platform_settings(), checkpoint_dir=tmp_path / "checkpoints",
                        is_template=lambda name: name == TEMPLATE)


@contextlib.asynccontextmanager
async def plane_on_fake(tmp_path, **options):
    """A started control plane on a fake runtime, an API key id for it, and the runtime."""
    options.setdefault("resume_warm_s", 60)
    orchestrator, fake = fake_orchestrator(tmp_path / "runtime", **options)
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")
    key, _ = await ApiKeys(database).create("fast tests")
    plane = control_plane(database, orchestrator, tmp_path)
    await plane.start()
    try:
        yield plane, fake, key.owner
    finally:
        await plane.close()


async def create(plane: ControlPlane, key: str, template: str = TEMPLATE, **lifecycle):
    return await plane.sandboxes.create(key, template, timeout=None, metadata={}, env_vars={}, internet=True,
                                        lifecycle=lifecycle)


async def exists(plane: ControlPlane, key: str, sandbox_id: str) -> bool:
    try:
        await plane.sandboxes.get(key, sandbox_id)
    except ApiError as e:
        assert e.status == 404
        return False
    return True


async def gone(plane: ControlPlane, key: str, sandbox_id: str) -> bool:
    return not await exists(plane, key, sandbox_id)


async def state_is(plane: ControlPlane, key: str, sandbox_id: str, state: str) -> bool:
    return (await plane.sandboxes.get(key, sandbox_id)).state == state


async def test_kill_during_a_pause_waits_for_it_and_leaves_nothing(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        row = await create(plane, key)
        gate = fake.block("checkpoint")
        pausing = asyncio.ensure_future(plane.branching.pause(key, row.id))
        await fake.called("checkpoint")
        killing = asyncio.ensure_future(plane.sandboxes.kill(key, row.id))
        await asyncio.sleep(0.01)
        assert not killing.done()  # it waits for the pause
        gate.set()
        await asyncio.gather(pausing, killing)
        assert not await exists(plane, key, row.id)
        assert list((tmp_path / "checkpoints").iterdir()) == []
    fake.assert_clean()


async def test_timeout_expiry_kills_the_sandbox(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        row = await create(plane, key)
        await plane.sandboxes.set_timeout(key, row.id, 0)
        await until(lambda: gone(plane, key, row.id), what="the sandbox's end")
        await until(lambda: fake.containers() == [], what="the sandbox's teardown")
    fake.assert_clean()


async def test_timeout_with_on_timeout_pause_pauses_the_sandbox(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        row = await create(plane, key, onTimeout="pause")
        await plane.sandboxes.set_timeout(key, row.id, 0)
        await until(lambda: state_is(plane, key, row.id, "paused"), what="the pause")
        assert fake.containers(LIVE) == []
        await plane.sandboxes.kill(key, row.id)
    fake.assert_clean()


async def test_failed_pause_leaves_the_sandbox_running(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        row = await create(plane, key)
        fake.fail_next("checkpoint", SandboxFailed("checkpoint failed: boom"))
        with pytest.raises(SandboxFailed):
            await plane.branching.pause(key, row.id)
        assert (await plane.sandboxes.get(key, row.id)).state == "running"
        assert row.id in plane.orchestrator.live_ids()
        await plane.sandboxes.kill(key, row.id)
    fake.assert_clean()


async def test_resume_after_pause_starts_in_the_held_container(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        row = await create(plane, key)
        await plane.branching.pause(key, row.id)
        await until(lambda: plane.orchestrator.resume_ready() == 1, what="the resume's container")
        (held,) = fake.prepared()
        prepares = fake.calls["prepare"]
        resumed, was_paused = await plane.branching.resume(key, row.id, timeout=None)
        assert was_paused
        assert resumed.runtime_id == held.id
        assert fake.calls["prepare"] == prepares
        await plane.sandboxes.kill(key, row.id)
    fake.assert_clean()


async def test_a_pause_holds_a_container_stocked_for_its_template_instead_of_preparing_one(tmp_path):
    async with plane_on_fake(tmp_path, prepared_size=1) as (plane, fake, key):
        row = await create(plane, key)  # `base` is stocked from now on
        await until(lambda: len(fake.prepared()) == 1, what="the template's stock")
        (stocked,) = fake.prepared()
        await plane.branching.pause(key, row.id)
        # Held at once: the resume right after the pause waits for no new container.
        assert plane.orchestrator.resume_ready() == 1
        resumed, was_paused = await plane.branching.resume(key, row.id, timeout=None)
        assert was_paused
        assert resumed.runtime_id == stocked.id
        await until(lambda: len(fake.prepared()) == 1, what="the template's stock refilled")
        await plane.sandboxes.kill(key, row.id)
    fake.assert_clean()


async def test_a_pause_resume_loop_keeps_the_template_stock_when_users_never_pause(tmp_path):
    async with plane_on_fake(tmp_path, prepared_size=1) as (plane, fake, key):
        row = await create(plane, key)
        await until(lambda: len(fake.prepared()) == 1, what="the template's stock")
        with plane.orchestrator.capacity.user_work():  # someone's restore never ends: no quiet moment
            for _ in range(3):
                await plane.branching.pause(key, row.id)
                assert plane.orchestrator.resume_ready() == 1
                await plane.branching.resume(key, row.id, timeout=None)
                await until(lambda: len(fake.prepared()) == 1, what="the stock put back")
        await plane.sandboxes.kill(key, row.id)
    fake.assert_clean()


async def test_fork_starts_clones_in_containers_prepared_alongside_its_checkpoint(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        row = await create(plane, key)  # `base` is stocked from now on: its containers fit small snapshots
        clones = await plane.branching.fork(key, row.id, count=3, timeout=None)
        assert all(not isinstance(c, BaseException) for c in clones)
        assert fake.calls["prepare"] == 1 + 3  # the source's container, then one per clone made alongside
        assert fake.prepared() == []
        for sandbox_id in [row.id, *(c.id for c in clones)]:
            await plane.sandboxes.kill(key, sandbox_id)
    fake.assert_clean()


async def test_create_from_a_filesystem_only_snapshot_cold_boots_it(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        source = await create(plane, key)
        await plane.branching.snapshot(key, source.id, name="files", memory=False)
        row = await create(plane, key, template="files")
        assert row.id in plane.orchestrator.live_ids()
        for sandbox_id in (source.id, row.id):
            await plane.sandboxes.kill(key, sandbox_id)
    fake.assert_clean()


async def test_running_sandboxes_are_adopted_after_a_restart(tmp_path):
    async with plane_on_fake(tmp_path) as (plane, fake, key):
        row = await create(plane, key)
    assert [c.id for c in fake.containers(LIVE)] == [row.id]
    orchestrator = Orchestrator(fake, fake.template_path, envd=FakeEnvd(fake))
    restarted = control_plane(open_database(f"sqlite:///{tmp_path / 'corral.db'}"), orchestrator, tmp_path)
    await restarted.start()
    try:
        assert await exists(restarted, key, row.id)
        assert orchestrator.live_ids() == {row.id}
        await restarted.sandboxes.kill(key, row.id)
    finally:
        await restarted.close()
    fake.assert_clean()
