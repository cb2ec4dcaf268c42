"""What the fast tests (tests/test_fast_*.py) share: an orchestrator on the fake runtime, and waiting for a
condition without sleeping longer than it takes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.orchestrator.sandboxes import Orchestrator
from corral.runtime.fake import FakeEnvd, FakeRuntime

TEMPLATE = "base"


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0,
                what: str = "the condition") -> None:
    """Returns as soon as `condition()` (or what it returns, when that is awaitable) holds; fails the test
    after `timeout` (a hang, not a slow host)."""
    async def holds() -> bool:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    async def poll() -> None:
        while not await holds():  # noqa: ASYNC110 (an arbitrary condition: no event to wait on)
            await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"{what} did not come true within {timeout}s") from None


def fake_orchestrator(root: Path, **options) -> tuple[Orchestrator, FakeRuntime]:
    """An orchestrator on a fake runtime with template `base` built; `options` go to Orchestrator."""
    fake = FakeRuntime(root)
    fake.make_template(TEMPLATE)
    return Orchestrator(fake, fake.template_path, envd=FakeEnvd(fake), **options), fake


@contextlib.asynccontextmanager
async def running(orchestrator: Orchestrator):
    """The orchestrator started (and closed after the block); live sandboxes are left to the test."""
    await orchestrator.start(keep={})
    try:
        yield orchestrator
    finally:
        await orchestrator.close()


async def stocked(orchestrator: Orchestrator, *, ready: int = 0, prepared: int = 0) -> None:
    """Waits until the capacity manager holds `ready` ready sandboxes and `prepared` prepared containers
    of `base`."""
    capacity = orchestrator.capacity
    await until(lambda: capacity.ready(TEMPLATE) >= ready
                and capacity.prepared(orchestrator.template_snapshot(TEMPLATE)) >= prepared,
                what=f"{ready} ready sandbox(es) and {prepared} prepared container(s)")


def orphans(orchestrator: Orchestrator) -> list[str]:
    """Prepared containers the runtime holds that the capacity manager does not know of (leaked until the
    runtime closes)."""
    known = orchestrator.capacity.prepared_ids()
    return [p.id for p in orchestrator.runtime.prepared() if p.id not in known]
