"""The runtime's contract on the fake backend (no root): teardown exactly once, whoever asks and however
often; a cancelled or failed prepare or start leaves nothing; state changes only along allowed
transitions. And the gVisor backend's own destroy, with its host work stubbed out."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from corral.runtime.base import ContainerState, Resources, SandboxConfig, SandboxFailed, SandboxNotFound
from corral.runtime.containers import ContainerTable, IllegalTransition
from corral.runtime.fake import FakeContainer, FakeRuntime

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def live_sandbox(fake: FakeRuntime):
    snapshot = fake.make_template("base")
    return await fake.start(await fake.prepare(snapshot, Resources()), SandboxConfig())


async def test_concurrent_destroys_tear_down_once(tmp_path):
    fake = FakeRuntime(tmp_path)
    sandbox = await live_sandbox(fake)
    fake.delays["teardown"] = 0.02
    await asyncio.gather(fake.destroy(sandbox.id), fake.destroy(sandbox.id), fake.destroy(sandbox.id))
    assert fake.calls["teardown"] == 1
    fake.assert_clean()


async def test_second_destroy_waits_for_the_first_teardown(tmp_path):
    fake = FakeRuntime(tmp_path)
    sandbox = await live_sandbox(fake)
    gate = fake.block("teardown")
    first = asyncio.ensure_future(fake.destroy(sandbox.id))
    await fake.called("teardown")
    second = asyncio.ensure_future(fake.destroy(sandbox.id))
    await asyncio.sleep(0.01)
    assert not second.done()
    gate.set()
    await asyncio.gather(first, second)
    assert fake.state(sandbox.id) is ContainerState.GONE
    fake.assert_clean()


async def test_destroy_after_destroy_raises_sandbox_not_found(tmp_path):
    fake = FakeRuntime(tmp_path)
    sandbox = await live_sandbox(fake)
    await fake.destroy(sandbox.id)
    with pytest.raises(SandboxNotFound):
        await fake.destroy(sandbox.id)
    assert fake.calls["teardown"] == 1


async def test_cancelled_destroy_still_finishes_the_teardown(tmp_path):
    fake = FakeRuntime(tmp_path)
    sandbox = await live_sandbox(fake)
    container = fake.table.get(sandbox.id)
    gate = fake.block("teardown")
    destroy = asyncio.ensure_future(fake.destroy(sandbox.id))
    await fake.called("teardown")
    destroy.cancel()
    gate.set()
    await asyncio.wait_for(container.gone.wait(), 5)
    fake.assert_clean()


async def test_cancelled_prepare_leaves_nothing(tmp_path):
    fake = FakeRuntime(tmp_path)
    snapshot = fake.make_template("base")
    fake.block("prepare")
    prepare = asyncio.ensure_future(fake.prepare(snapshot, Resources()))
    await fake.called("prepare")
    prepare.cancel()
    with pytest.raises(asyncio.CancelledError):
        await prepare
    fake.assert_clean()


async def test_start_of_a_dead_container_fails_and_frees_it(tmp_path):
    fake = FakeRuntime(tmp_path)
    prepared = await fake.prepare(fake.make_template("base"), Resources())
    fake.die(prepared.id)
    with pytest.raises(SandboxFailed):
        await fake.start(prepared, SandboxConfig())
    fake.assert_clean()


async def test_a_container_starts_only_once(tmp_path):
    fake = FakeRuntime(tmp_path)
    prepared = await fake.prepare(fake.make_template("base"), Resources())
    sandbox = await fake.start(prepared, SandboxConfig())
    with pytest.raises(SandboxFailed, match="not prepared"):
        await fake.start(prepared, SandboxConfig())
    await fake.destroy(sandbox.id)
    fake.assert_clean()


async def test_failed_checkpoint_leaves_the_sandbox_running_and_no_snapshot(tmp_path):
    fake = FakeRuntime(tmp_path)
    sandbox = await live_sandbox(fake)
    fake.fail_next("checkpoint", SandboxFailed("disk full"))
    with pytest.raises(SandboxFailed):
        await fake.checkpoint(sandbox.id, tmp_path / "cp")
    assert fake.state(sandbox.id) is ContainerState.LIVE
    assert not (tmp_path / "cp").exists()


async def test_state_changes_only_along_allowed_transitions():
    table: ContainerTable[FakeContainer] = ContainerTable()
    container = table.add(FakeContainer(id="c", template="t", address="127.0.1.1", config=SandboxConfig(),
                                        stands_on=frozenset()))
    with pytest.raises(IllegalTransition, match="preparing -> live"):
        table.move(container, ContainerState.LIVE)
    table.move(container, ContainerState.TEARING_DOWN)
    table.move(container, ContainerState.GONE)
    with pytest.raises(IllegalTransition):
        table.move(container, ContainerState.TEARING_DOWN)
    assert table.get("c") is None


async def test_gvisor_concurrent_destroys_free_the_container_once(tmp_path, monkeypatch):
    """GVisorRuntime.destroy itself (what host work _free does is stubbed: it needs root)."""
    from corral.config import Settings
    from corral.runtime.gvisor import GVisorRuntime
    from corral.runtime.gvisor.containers import Container

    settings = Settings(data_dir=tmp_path / "data", run_dir=tmp_path / "run",
                        sandbox_network=ipaddress.IPv4Network("10.250.0.0/24"), instance="ft")
    runtime = GVisorRuntime(settings)
    freed = []

    async def free(c):
        freed.append(c.id)
        await asyncio.sleep(0.02)
        runtime.table.move(c, ContainerState.GONE)

    monkeypatch.setattr(runtime, "_free", free)
    c = runtime.table.add(Container(id="i1", template="base", slot=runtime.slots.claim(0), config=SandboxConfig(),
                                    lowers=[], dir=tmp_path / "i1"))
    for state in (ContainerState.PREPARED, ContainerState.STARTING, ContainerState.LIVE):
        runtime.table.move(c, state)
    await asyncio.gather(runtime.destroy("i1"), runtime.destroy("i1"))
    assert freed == ["i1"]
    with pytest.raises(SandboxNotFound):
        await runtime.destroy("i1")
