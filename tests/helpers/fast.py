"""What the fast tests (tests/test_fast_*.py) share: an orchestrator on the fake runtime, the API over a
started control plane on it, and waiting for a condition without sleeping longer than it takes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.config import PlatformSettings
from corral.control.api import create_api
from corral.control.db import Database, open_database
from corral.control.keys import ApiKeys
from corral.control.plane import ControlPlane
from corral.observability.metrics import ServerMetrics
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


@dataclass
class Platform:
    """The API over a started control plane on the fake runtime, and an HTTP client of it."""

    http: httpx.AsyncClient
    plane: ControlPlane
    keys: ApiKeys
    fake: FakeRuntime
    app: object


@contextlib.asynccontextmanager
async def platform(tmp_path: Path, settings: PlatformSettings, *, client=("127.0.0.1", 40000),
                   runtime_options: dict | None = None, webhooks: Callable[[Database], object] | None = None,
                   **plane_options):
    """`plane_options` go to ControlPlane; `webhooks(database)` makes its webhooks service; `client` is the
    address requests come from."""
    orchestrator, fake = fake_orchestrator(tmp_path / "runtime", **(runtime_options or {}))
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")
    keys = ApiKeys(database)
    if webhooks is not None:
        plane_options["webhooks"] = webhooks(database)
    plane = ControlPlane(database, orchestrator, settings, checkpoint_dir=tmp_path / "checkpoints",
                         is_template=lambda name: name == TEMPLATE, metrics=ServerMetrics(), **plane_options)
    await plane.start()
    app = create_api(plane, keys)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client),
                                     base_url="http://corral") as http:
            yield Platform(http, plane, keys, fake, app)
    finally:
        await plane.close()
