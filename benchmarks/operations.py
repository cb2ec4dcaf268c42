"""What the operations layer (scopes, key limits, team quotas and spending cap, lifecycle events, usage
metering) costs on a create and on a proxied request, next to the same with it turned off, in the same run.

    .venv/bin/python benchmarks/operations.py [--creates 300] [--requests 2000] [--write docs/benchmarks.md]

In one process, without root: the API over a control plane on the fake runtime (corral.runtime.fake), so a
create is the control plane's own work (its database writes included) and nothing of gVisor's, which would
hide a millisecond in its noise. "On": a key with limits in a team with every quota and a budget set (every
check runs its query), events recorded, metering settling each kill. "Off": the pre-teams path: the key looked
up without its team, no scope, no limits, no quotas, no events, no metering. Creates alternate between the two
in blocks, each followed by a kill (not timed).

Proxied requests: the proxy consults neither scopes nor metering; what can reach it is the metering flushes
running on the same event loop and database thread. "On": 50 running sandboxes flushed every 50 ms (200x
the default rate) while requests go through Corral's sandbox proxy to an HTTP server on loopback; "off": no
flushes. Targets: <= 1 ms p50 added to a create, <= 0.2 ms to a proxied request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp.web
import httpx
from fastapi import Header, Request
from helpers.fast import TEMPLATE, fake_orchestrator

from benchmarks.envd import pct
from benchmarks.report import targets_table, write_section
from corral.config import PlatformSettings
from corral.control import sandboxes as sandboxes_module
from corral.control.api import create_api
from corral.control.api_common import authenticated
from corral.control.db import open_database
from corral.control.errors import ApiError
from corral.control.keys import ApiKeys, KeyLimits
from corral.control.metering import Meter, Prices
from corral.control.plane import ControlPlane
from corral.observability.metrics import ServerMetrics
from corral.proxy.proxy import SandboxProxy

TARGETS = {"create_ms": 1.0, "proxy_ms": 0.2}
SETTINGS = PlatformSettings(database_url="", pool_size=0, pool_templates=(), prepared_pool_size=0, resume_warm_s=0,
                            resume_warm_max=4, max_timeout_s=0, metrics_interval_s=3600, metrics_kept=10,
                            idle_freeze_s=0, idle_fresh_s=0, idle_breathe_every_s=10, metrics_token="",
                            metrics_public=False, metering_interval_s=0)
BLOCK = 25


class _NoAdmission:
    """The admission of before teams: nothing to check."""

    @contextlib.asynccontextmanager
    async def starting(self, *_, **__):
        yield

    def check_lifetime(self, *_):
        pass


@contextlib.contextmanager
def operations_off(plane: ControlPlane, app, keys: ApiKeys):
    """The pre-teams path for the block: key lookup only, no scopes, limits, quotas, events or metering."""
    from sqlalchemy import select

    from corral.control.db import ApiKeyRow
    from corral.control.keys import ApiKey, _digest

    async def key_only(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> ApiKey:
        digest = _digest(x_api_key or "")
        row = await keys._db.read(lambda s: s.scalar(select(ApiKeyRow).where(ApiKeyRow.digest == digest)))
        if row is None or row.revoked_at is not None:
            raise ApiError(401, "Invalid API key")
        return ApiKey(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at, revoked_at=None,
                      team_id=row.team_id)

    admission, events, settle = plane.sandboxes.admission, plane.sandboxes.events, sandboxes_module.settle_sandbox
    app.dependency_overrides[authenticated] = key_only
    plane.sandboxes.admission, plane.sandboxes.events = _NoAdmission(), None
    sandboxes_module.settle_sandbox = lambda *_: None
    try:
        yield
    finally:
        app.dependency_overrides.clear()
        plane.sandboxes.admission, plane.sandboxes.events = admission, events
        sandboxes_module.settle_sandbox = settle


async def creates(n: int) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory(prefix="corral-bench-ops-") as tmp:
        root = Path(tmp)
        orchestrator, _ = fake_orchestrator(root / "runtime")
        database = open_database(f"sqlite:///{root / 'corral.db'}")
        keys = ApiKeys(database)
        plane = ControlPlane(database, orchestrator, SETTINGS, checkpoint_dir=root / "checkpoints",
                             is_template=lambda name: name == TEMPLATE, metrics=ServerMetrics())
        await plane.start()
        team = await keys.create_team("bench")
        await keys.update_team(team.id, max_concurrent=10**6, max_vcpus=10.0**6, max_memory_mb=10**9,
                               max_lifetime_s=10**6, creates_per_s=10.0**6, budget=10.0**9)
        _, secret = await keys.create("bench", team=team.id, limits=KeyLimits(
            templates=(TEMPLATE,), max_timeout_s=3600, max_vcpus=64, max_memory_mb=65536, max_concurrent=10**6))
        headers = {"X-API-KEY": secret}
        app = create_api(plane, keys)
        on: list[float] = []
        off: list[float] = []
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://corral") as http:
                async def one(samples: list[float] | None) -> None:
                    began = time.perf_counter()
                    answer = await http.post("/v2/sandboxes", headers=headers, json={"templateID": TEMPLATE,
                                                                                     "timeout": 600})
                    took = (time.perf_counter() - began) * 1000
                    if answer.status_code != 201:
                        raise RuntimeError(f"create failed: {answer.status_code} {answer.text}")
                    if samples is not None:
                        samples.append(took)
                    await http.delete(f"/sandboxes/{answer.json()['sandboxID']}", headers=headers)

                for _ in range(10):  # warm-up of both paths
                    await one(None)
                    with operations_off(plane, app, keys):
                        await one(None)
                while len(on) < n:
                    for _ in range(BLOCK):
                        await one(on)
                    with operations_off(plane, app, keys):
                        for _ in range(BLOCK):
                            await one(off)
        finally:
            await plane.close()
            database.close()
    return on, off


async def proxied(n: int) -> tuple[list[float], list[float]]:
    async def echo(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=b"pong:" + await request.read())

    web = aiohttp.web.Application()
    web.router.add_post("/echo", echo)
    runner = aiohttp.web.AppRunner(web)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]

    async def resolve(sandbox_id: str) -> str | None:
        return "127.0.0.1"

    proxy = SandboxProxy(resolve)

    async def app(scope, receive, send):
        await proxy(scope, receive, send, "sandbox", port)

    with tempfile.TemporaryDirectory(prefix="corral-bench-ops-") as tmp:
        database = open_database(f"sqlite:///{Path(tmp) / 'corral.db'}")
        await _running_sandboxes(database, 50)
        meter = Meter(database, Prices(), interval_s=0.05)
        on: list[float] = []
        off: list[float] = []
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as client:
                async def one(samples: list[float]) -> None:
                    began = time.perf_counter()
                    answer = await client.post("/echo", content=b"ping")
                    samples.append((time.perf_counter() - began) * 1000)
                    if answer.content != b"pong:ping":
                        raise RuntimeError(f"proxied request failed: {answer.status_code}")

                for _ in range(50):
                    await one([])
                while len(on) < n:
                    meter.start()
                    for _ in range(BLOCK * 4):
                        await one(on)
                    await meter.close()
                    for _ in range(BLOCK * 4):
                        await one(off)
        finally:
            await meter.close()
            await proxy.close()
            await runner.cleanup()
            database.close()
    return on, off


async def _running_sandboxes(database, count: int) -> None:
    from corral.control.db import ApiKeyRow, SandboxRow, TeamRow

    now = time.time()
    await database.write(lambda s: s.add(TeamRow(id="team", name="team", created_at=now)))
    await database.write(lambda s: s.add(ApiKeyRow(id="key", name="key", prefix="e2b_", digest="0" * 64,
                                                   created_at=now, team_id="team")))
    await database.write(lambda s: s.add_all([
        SandboxRow(id=f"sbx{i}", key_id="key", team_id="team", template="base", envd_token="t", sandbox_metadata={},
                   env_vars={}, started_at=now, end_at=now + 3600, vcpus=2, memory_mb=512, disk_mb=2048,
                   internet=True, state="running", lifecycle={}, timeout_s=3600) for i in range(count)]))


def stats(samples: list[float]) -> str:
    return f"{pct(samples, 50):.3f} | {pct(samples, 99):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=300, help="timed creates with the layer on (and as many off)")
    parser.add_argument("--requests", type=int, default=2000, help="timed proxied requests on (and as many off)")
    parser.add_argument("--write", type=Path, help="write the results into this file's Operations section")
    args = parser.parse_args()
    create_on, create_off = asyncio.run(creates(args.creates))
    print(f"create p50 | p99 ms: on {stats(create_on)}, off {stats(create_off)}", flush=True)
    proxy_on, proxy_off = asyncio.run(proxied(args.requests))
    print(f"proxied request p50 | p99 ms: on {stats(proxy_on)}, off {stats(proxy_off)}", flush=True)
    create_cost = pct(create_on, 50) - pct(create_off, 50)
    proxy_cost = pct(proxy_on, 50) - pct(proxy_off, 50)
    lines = [
        "In one process on the fake runtime (a create is the control plane's own work, its SQLite writes "
        "included, and none of gVisor's). On: a key with limits in a team with every quota and a budget set, "
        "events recorded, metering settling each kill; off: the key looked up alone, nothing else. Creates "
        f"alternate in blocks of {BLOCK}. Proxied requests go through Corral's sandbox proxy to an HTTP server on "
        "loopback; on: 50 running sandboxes' usage flushed every 50 ms (200x the default rate) meanwhile.",
        "",
        "| measure | n | on, p50 / p99 ms | off, p50 / p99 ms | added at p50, ms | mean on / off, ms |",
        "|---|---|---|---|---|---|",
        f"| create (`POST /v2/sandboxes`) | {len(create_on)} | {stats(create_on).replace(' | ', ' / ')} | "
        f"{stats(create_off).replace(' | ', ' / ')} | {create_cost:.3f} | "
        f"{statistics.mean(create_on):.3f} / {statistics.mean(create_off):.3f} |",
        f"| proxied request (POST, 4-byte body) | {len(proxy_on)} | {stats(proxy_on).replace(' | ', ' / ')} | "
        f"{stats(proxy_off).replace(' | ', ' / ')} | {proxy_cost:.3f} | "
        f"{statistics.mean(proxy_on):.3f} / {statistics.mean(proxy_off):.3f} |",
        "",
        *targets_table([
            (f"scopes, limits, quotas, events and metering add <= {TARGETS['create_ms']:g} ms p50 to a create",
             f"{create_cost:.3f} ms", create_cost <= TARGETS["create_ms"]),
            (f"... and <= {TARGETS['proxy_ms']:g} ms p50 to a proxied request", f"{proxy_cost:.3f} ms",
             proxy_cost <= TARGETS["proxy_ms"]),
        ]),
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "operations-benchmark", report, heading="Operations: scopes, quotas, metering",
                      command=f".venv/bin/python benchmarks/operations.py --creates {args.creates} "
                              f"--requests {args.requests} --write {args.write}")


if __name__ == "__main__":
    main()
