"""The dashboard's sandboxes page with 500 sandboxes: server time of the full page and of the table partial
htmx polls every second, next to the REST API's `GET /v2/sandboxes` listing the same rows, in the same run.

    .venv/bin/python benchmarks/dashboard.py [--sandboxes 500] [--runs 60] [--write docs/benchmarks.md]
    .venv/bin/python benchmarks/dashboard.py --serve 8765   # the seeded dashboard, to look at (prints a key)

In one process, without root: the API (and the dashboard it mounts) over a control plane on the fake runtime,
answered through httpx's ASGI transport, so the time is the server's own work (its SQLite reads and the
template rendering) and nothing of a network. The table pages its rows (PAGE_SIZE per page): the first
page and the last are measured. The rows are written straight into the database after the
plane started: 90% running, each with 24 CPU and memory samples (what the sparklines draw), 10% paused, with
metadata, across four templates, all of one team. Target (issue 20): the first page <= 300 ms server time."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx
from helpers.fast import TEMPLATE, fake_orchestrator

from benchmarks.envd import pct
from benchmarks.report import targets_table, write_section
from corral.config import PlatformSettings
from corral.control.api import create_api
from corral.control.db import MetricRow, SandboxRow, UsageDayRow, open_database
from corral.control.keys import ApiKeys
from corral.control.plane import ControlPlane
from corral.dashboard.pages.sandboxes import PAGE_SIZE
from corral.observability.metrics import ServerMetrics

TARGET_MS = 300.0
SETTINGS = PlatformSettings(database_url="", pool_size=0, pool_templates=(), prepared_pool_size=0, resume_warm_s=0,
                            resume_warm_max=4, max_timeout_s=0, metrics_interval_s=3600, metrics_kept=720,
                            idle_freeze_s=0, idle_fresh_s=0, idle_breathe_every_s=10, metrics_token="",
                            metrics_public=False, metering_interval_s=0)
TEMPLATES = ("base", "code-interpreter-v1", "desktop", "data-science")
SAMPLES = 24
SAMPLE_EVERY_S = 5.0


def seed(session, key_id: str, team_id: str, count: int, now: float) -> None:
    """`count` sandboxes of the team, their samples, and 30 days of usage."""
    rng = random.Random(20)
    for n in range(count):
        running = n % 10 != 0
        started = now - rng.uniform(30, 3 * 3600)
        sandbox_id = f"i{n:05d}{rng.getrandbits(40):010x}"
        session.add(SandboxRow(id=sandbox_id, key_id=key_id, team_id=team_id, template=TEMPLATES[n % 4],
                               envd_token="x", sandbox_metadata={"job": f"job-{n % 37}", "user": f"u{n % 11}"},
                               env_vars={}, started_at=started, end_at=now + rng.uniform(60, 3600), vcpus=2,
                               memory_mb=1024, disk_mb=4096, state="running" if running else "paused",
                               lifecycle={}, timeout_s=300))
        if running:
            level = rng.uniform(2, 70)
            for i in range(SAMPLES):
                level = max(0.5, min(99.0, level + rng.uniform(-8, 8)))
                session.add(MetricRow(sandbox_id=sandbox_id, ts=now - (SAMPLES - i) * SAMPLE_EVERY_S, cpu_count=2,
                                      cpu_used_pct=level, mem_used=int((200 + level * 6) * 2**20),
                                      mem_total=1024 * 2**20, mem_cache=0, disk_used=2**30, disk_total=4 * 2**30))
    for day in range(30):
        stamp = time.strftime("%Y-%m-%d", time.gmtime(now - day * 86400))
        for t, template in enumerate(TEMPLATES):
            hours = rng.uniform(2, 40) * (4 - t) / 2
            session.add(UsageDayRow(team_id=team_id, key_id=key_id, template=template, day=stamp,
                                    vcpu_s=hours * 3600 * 2, memory_gib_s=hours * 3600))


@contextlib.asynccontextmanager
async def seeded(tmp: Path, count: int):
    """(the API app, an admin key's secret) over `count` seeded sandboxes."""
    orchestrator, _ = fake_orchestrator(tmp / "runtime")
    database = open_database(f"sqlite:///{tmp / 'corral.db'}")
    keys = ApiKeys(database)
    plane = ControlPlane(database, orchestrator, SETTINGS, checkpoint_dir=tmp / "checkpoints",
                         is_template=lambda name: name == TEMPLATE, metrics=ServerMetrics())
    await plane.start()
    try:
        key, secret = await keys.create("benchmark", scopes=["admin"])
        now = time.time()
        await database.write(lambda session: seed(session, key.id, key.team_id, count, now))
        yield create_api(plane, keys), secret
    finally:
        await plane.close()


async def signed_in(http: httpx.AsyncClient, secret: str) -> None:
    form = await http.get("/dashboard/signin")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    answer = await http.post("/dashboard/signin", data={"key": secret, "csrf_token": token})
    assert answer.status_code == 303, answer.text


async def timed(http: httpx.AsyncClient, path: str, runs: int, headers: dict | None = None) -> list[float]:
    for _ in range(3):  # warm-up: template compilation, SQLite's caches
        (await http.get(path, headers=headers)).raise_for_status()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = await http.get(path, headers=headers)
        samples.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
    return samples


async def measure(count: int, runs: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        async with seeded(Path(tmp), count) as (app, secret):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://corral") as http:
                await signed_in(http, secret)
                page = await http.get("/dashboard/sandboxes")
                assert page.text.count("data-sandbox-id=") == min(count, PAGE_SIZE)
                assert f"of {count}</span>" in page.text or count <= PAGE_SIZE
                listed = await http.get("/v2/sandboxes", headers={"X-API-KEY": secret})
                assert len(listed.json()) == count
                return {"page": await timed(http, "/dashboard/sandboxes", runs),
                        "table": await timed(http, "/dashboard/sandboxes/table", runs),
                        "last": await timed(http, f"/dashboard/sandboxes/table?page={-(-count // PAGE_SIZE)}", runs),
                        "rest": await timed(http, "/v2/sandboxes", runs, {"X-API-KEY": secret})}


async def serve(count: int, port: int) -> None:
    import uvicorn

    with tempfile.TemporaryDirectory() as tmp:
        async with seeded(Path(tmp), count) as (app, secret):
            print(f"http://127.0.0.1:{port}/dashboard/  key: {secret}", flush=True)
            await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=500)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--write", type=Path, help="write the results into this markdown file (docs/benchmarks.md)")
    parser.add_argument("--serve", type=int, metavar="PORT", help="serve the seeded dashboard instead of measuring")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.sandboxes, args.serve))
        return
    results = asyncio.run(measure(args.sandboxes, args.runs))
    names = {"page": "dashboard: the sandboxes page (`GET /dashboard/sandboxes`)",
             "table": "dashboard: the table partial htmx polls (`GET /dashboard/sandboxes/table`)",
             "last": "dashboard: the table's last page (`?page=N`)",
             "rest": "baseline: REST `GET /v2/sandboxes`, the same rows as JSON"}
    lines = ["| request | n | p50 ms | p95 ms | mean ms |", "|---|---|---|---|---|"]
    for name, samples in results.items():
        lines.append(f"| {names[name]} | {len(samples)} | {pct(samples, 50):.1f} | {pct(samples, 95):.1f} | "
                     f"{statistics.mean(samples):.1f} |")
    first = pct(results["page"], 95)
    lines += ["", *targets_table([(f"the first page <= {TARGET_MS:.0f} ms server time with {args.sandboxes} "
                                   "sandboxes (p95)", f"{first:.1f} ms", first <= TARGET_MS)])]
    body = (f"{args.sandboxes} sandboxes of one team (90% running with {SAMPLES} CPU and memory samples each, "
            f"10% paused); the dashboard's table shows {PAGE_SIZE} per page (each with its sparklines and action "
            "buttons), newest first, and reads all of them to count, filter and page. In one process on the fake "
            "runtime through httpx's ASGI transport: the server's own "
            "work, SQLite reads and rendering included.\n\n" + "\n".join(lines))
    print(body)
    if args.write:
        command = f".venv/bin/python benchmarks/dashboard.py --sandboxes {args.sandboxes} --runs {args.runs} " \
                  f"--write {args.write}"
        write_section(args.write, "dashboard-benchmark", body, command, heading="Dashboard")


if __name__ == "__main__":
    main()
