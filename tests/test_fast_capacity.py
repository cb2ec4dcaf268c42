"""The capacity manager and the orchestrator's create and kill, on the fake runtime (no root): refills under
load, cancellation at any point, stock that turns out dead."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers.fast import TEMPLATE, fake_orchestrator, orphans, running, stocked, until

from corral.orchestrator import capacity
from corral.runtime.base import ContainerState, SandboxFailed

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_refills(monkeypatch):
    monkeypatch.setattr(capacity, "REFILL_DELAY_S", 0.01)


async def create(orchestrator, token: str = "token"):
    return await orchestrator.create(TEMPLATE, token=token, env_vars={}, internet=True)


async def test_concurrent_creates_succeed_refill_the_stock_and_keep_to_the_budget(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path, pool_size=2, pool_templates=(TEMPLATE,), prepared_size=2,
                                           budget=3)
    fake.delays.update(prepare=0.002, start=0.005)
    async with running(orchestrator):
        await stocked(orchestrator, ready=2, prepared=2)
        sandboxes = await asyncio.gather(*(create(orchestrator, f"t{i}") for i in range(20)))
        assert len({s.id for s in sandboxes}) == 20
        assert {orchestrator.envd.tokens[s.address] for s in sandboxes} == {f"t{i}" for i in range(20)}
        await stocked(orchestrator, ready=2, prepared=2)
        assert fake.peak["start"] <= 3
        for sandbox in sandboxes:
            await orchestrator.kill(sandbox.id)
    fake.assert_clean()


@pytest.mark.parametrize(("part", "operation"), [("runtime", "prepare"), ("runtime", "start"), ("envd", "warm")])
async def test_refill_cancelled_midway_leaves_nothing(tmp_path, part, operation):
    orchestrator, fake = fake_orchestrator(tmp_path, pool_size=1, pool_templates=(TEMPLATE,))
    steered = fake if part == "runtime" else orchestrator.envd
    steered.block(operation)
    await orchestrator.start(keep={})
    await steered.called(operation)
    await orchestrator.capacity.close()
    assert fake.containers() == []
    await orchestrator.close()
    fake.assert_clean()


async def test_create_succeeds_when_its_prepared_container_is_dead(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path, prepared_size=1)
    async with running(orchestrator):
        first = await create(orchestrator)  # from now on `base` is kept prepared
        await stocked(orchestrator, prepared=1)
        (pooled,) = fake.prepared()
        fake.die(pooled.id)
        second = await create(orchestrator)
        assert second.id != pooled.id
        assert fake.state(pooled.id) is ContainerState.GONE
        for sandbox in (first, second):
            await orchestrator.kill(sandbox.id)
    fake.assert_clean()


async def test_create_fails_when_the_fresh_container_fails_too(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path, prepared_size=1)
    async with running(orchestrator):
        first = await create(orchestrator)
        await stocked(orchestrator, prepared=1)
        fake.fail_next("start", SandboxFailed("restoring checkpoint failed: boom"), times=2)
        with pytest.raises(SandboxFailed, match="boom"):
            await create(orchestrator)
        assert fake.calls["start"] == 3  # the first create, the pooled container, one fresh one
        await orchestrator.kill(first.id)
    fake.assert_clean()


async def test_create_succeeds_when_its_ready_sandbox_was_destroyed_from_outside(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path, pool_size=1, pool_templates=(TEMPLATE,))
    async with running(orchestrator):
        await stocked(orchestrator, ready=1)
        (ready_id,) = orchestrator.capacity.ready_ids()
        await fake.destroy(ready_id)
        sandbox = await create(orchestrator)
        assert sandbox.id != ready_id
        await orchestrator.kill(sandbox.id)
    fake.assert_clean()


async def test_create_succeeds_when_its_ready_sandbox_died_while_it_waited(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path, pool_size=1, pool_templates=(TEMPLATE,))
    async with running(orchestrator):
        await stocked(orchestrator, ready=1)
        (ready_id,) = orchestrator.capacity.ready_ids()
        fake.die(ready_id)  # still live to the runtime; its envd no longer answers
        sandbox = await create(orchestrator)
        assert sandbox.id != ready_id
        assert fake.state(ready_id) is ContainerState.GONE
        await orchestrator.kill(sandbox.id)
    fake.assert_clean()


async def test_create_cancelled_while_waiting_for_the_budget_returns_its_prepared_container(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path, prepared_size=2, budget=1)
    async with running(orchestrator):
        first = await create(orchestrator)
        await stocked(orchestrator, prepared=2)
        gate = fake.block("start")
        holder = asyncio.ensure_future(create(orchestrator))  # takes the budget and waits in start
        await fake.called("start", 2)
        waiting = asyncio.ensure_future(create(orchestrator))
        snapshot = orchestrator.template_snapshot(TEMPLATE)
        await until(lambda: orchestrator.capacity.prepared(snapshot) == 0, what="both prepared containers taken")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert orphans(orchestrator) == []
        gate.set()
        for sandbox in (first, await holder):
            await orchestrator.kill(sandbox.id)
    fake.assert_clean()


async def test_close_after_a_failed_refill_does_not_wait_for_its_retry(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(capacity, "RETRY_DELAY_S", 600.0)
    orchestrator, fake = fake_orchestrator(tmp_path, pool_size=1, pool_templates=(TEMPLATE,))
    fake.fail_next("prepare", SandboxFailed("no space left"))
    with caplog.at_level(logging.WARNING, logger="corral.capacity"):
        await orchestrator.start(keep={})
        await until(lambda: "no space left" in caplog.text, what="the refill failure")
    closing = asyncio.ensure_future(orchestrator.close())
    await asyncio.wait({closing}, timeout=5)
    assert closing.done(), "close waited for the refill's retry"
    fake.assert_clean()


async def test_release_while_preparing_for_clones_leaves_no_orphans(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path)
    async with running(orchestrator):
        source = await create(orchestrator)  # stocks `base`, whose containers clones of it can take
        gate = fake.block("prepare")
        preparing = asyncio.ensure_future(orchestrator.capacity.prepare_alongside(TEMPLATE, source, 2))
        await fake.called("prepare", 3)
        await orchestrator.capacity.release(orchestrator.template_snapshot(TEMPLATE).path)
        gate.set()
        await preparing
        assert orphans(orchestrator) == []
        await orchestrator.kill(source.id)
    fake.assert_clean()


async def test_concurrent_kills_of_one_sandbox_tear_it_down_once(tmp_path):
    orchestrator, fake = fake_orchestrator(tmp_path)
    async with running(orchestrator):
        sandbox = await create(orchestrator)
        fake.delays["teardown"] = 0.01
        results = await asyncio.gather(orchestrator.kill(sandbox.id), orchestrator.kill(sandbox.id))
        assert sorted(results) == [False, True]
        assert fake.teardowns[sandbox.id] == 1
    fake.assert_clean()
