"""Usage metering, its cost and teams' spending caps, on the fake runtime without root: a sandbox's usage
against the time the test measured, pause moving it from CPU and memory to snapshot storage, exactly-once
recording over crashes and failed flushes, days split at midnight, the price table, and caps with their
warnings, refusals and the pause policy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import httpx
import pytest
from helpers.fast import TEMPLATE, platform
from sqlalchemy import select

from corral.control import events, metering
from corral.control.db import ApiKeyRow, SandboxRow, TeamRow, UsageDayRow, open_database
from corral.control.keys import ApiKeys
from corral.control.metering import Meter, Prices
from corral.orchestrator import capacity

from test_fast_scopes import NEW_SANDBOX, SETTINGS  # isort: skip

pytestmark = pytest.mark.anyio

NO_FLUSHES = dataclasses.replace(SETTINGS, metering_interval_s=0)  # the tests flush when they mean to


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_refills(monkeypatch):
    monkeypatch.setattr(capacity, "REFILL_DELAY_S", 0.01)


@contextlib.asynccontextmanager
async def served(tmp_path, prices: Prices = Prices()):
    """(HTTP client, plane, keys service, headers of a key of a fresh team)."""
    async with platform(tmp_path, NO_FLUSHES, prices=prices) as served:
        _, secret = await served.keys.create("metered")
        yield served.http, served.plane, served.keys, {"X-API-KEY": secret}


async def total(http: httpx.AsyncClient, headers: dict) -> dict:
    answer = await http.get("/usage", params={"groupBy": ""}, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["total"]


async def test_a_sandbox_is_metered_for_the_time_it_ran_within_2_percent(tmp_path):
    async with served(tmp_path) as (http, _, _, headers):
        before = time.time()
        created = await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)
        after_create = time.time()
        await asyncio.sleep(5.0)
        before_kill = time.time()
        assert (await http.delete(f"/sandboxes/{created.json()['sandboxID']}", headers=headers)).status_code == 204
        after = time.time()
        # It ran at least from the end of the create to the start of the kill, at most the whole span; the
        # test's own measure is from the create's answer to the kill's (the fake runtime's teardown is instant).
        usage = await total(http, headers)
        vcpus, memory_gib = 2, 512 / 1024  # `base` on the fake runtime: the default resources
        assert vcpus * (before_kill - after_create) <= usage["vcpuSeconds"] <= vcpus * (after - before)
        ran = usage["vcpuSeconds"] / vcpus
        assert abs(ran - (after - after_create)) / (after - after_create) < 0.02
        assert usage["memoryGiBSeconds"] == pytest.approx(memory_gib * ran)
        assert usage["diskGiBHours"] == pytest.approx(2048 / 1024 * ran / 3600)
        sandbox = await http.get(f"/sandboxes/{created.json()['sandboxID']}/usage", headers=headers)
        assert sandbox.status_code == 200 and sandbox.json()["runningSeconds"] == pytest.approx(ran)
        # It no longer runs: nothing more accrues.
        await asyncio.sleep(0.2)
        assert (await total(http, headers))["vcpuSeconds"] == usage["vcpuSeconds"]


async def test_pause_stops_cpu_and_memory_metering_and_starts_snapshot_storage(tmp_path):
    async with served(tmp_path) as (http, _, _, headers):
        before = time.time()
        sandbox_id = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        await asyncio.sleep(0.5)
        assert (await http.post(f"/sandboxes/{sandbox_id}/pause", headers=headers)).status_code == 204
        paused_at = time.time()
        at_pause = await total(http, headers)
        assert 2 * 0.5 <= at_pause["vcpuSeconds"] <= 2 * (paused_at - before)
        await asyncio.sleep(1.0)
        paused = await total(http, headers)
        assert paused["vcpuSeconds"] == at_pause["vcpuSeconds"]
        assert paused["memoryGiBSeconds"] == at_pause["memoryGiBSeconds"]
        assert paused["snapshotGiBHours"] > at_pause["snapshotGiBHours"] >= 0
        # Resumed, it is metered again from the resume on, not for the time it was paused.
        resuming = time.time()
        assert (await http.post(f"/sandboxes/{sandbox_id}/connect", headers=headers,
                                json={"timeout": 60})).status_code in (200, 201)
        await asyncio.sleep(0.3)
        resumed = await total(http, headers)
        assert 2 * 0.3 <= resumed["vcpuSeconds"] - paused["vcpuSeconds"] < 2 * (time.time() - resuming)


def _running_row(started_at: float, *, sandbox_id: str = "sbx-1", team_id: str = "team-a"):
    row = SandboxRow(id=sandbox_id, key_id="k", team_id=team_id, template="base", envd_token="t", sandbox_metadata={},
                     env_vars={}, started_at=started_at, end_at=started_at + 3600, vcpus=2, memory_mb=1024,
                     disk_mb=1024, internet=True, state="running", lifecycle={}, timeout_s=3600)
    return row


async def _vcpu_s(database) -> float:
    return await database.read(lambda s: sum(r.vcpu_s for r in s.scalars(select(UsageDayRow))))


async def test_a_crash_between_flushes_neither_loses_nor_doubles_usage(tmp_path):
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    database = open_database(url)
    await _team_and_key(database)
    await database.write(lambda s: s.add(_running_row(1000.0)))
    clock = [1010.0]
    await Meter(database, Prices(), interval_s=0, clock=lambda: clock[0]).flush()
    assert await _vcpu_s(database) == pytest.approx(2 * 10)
    # The server dies (no close, no last flush); another one opens the same database later and flushes.
    database.close()
    database = open_database(url)
    clock[0] = 1025.0
    second = Meter(database, Prices(), interval_s=0, clock=lambda: clock[0])
    await second.flush()
    await second.flush()  # twice at the same moment: nothing more
    assert await _vcpu_s(database) == pytest.approx(2 * 25)
    # Two servers (or `corral usage` beside the server) flushing alike still count each second once.
    clock[0] = 1030.0
    beside = Meter(open_database(url), Prices(), interval_s=0, clock=lambda: clock[0])
    await asyncio.gather(beside.flush(), second.flush())
    assert await _vcpu_s(database) == pytest.approx(2 * 30)


async def _team_and_key(database) -> None:
    """Team `team-a` and its key `k`, as rows (the team first: the key refers to it)."""
    await database.write(lambda s: s.add(TeamRow(id="team-a", name="a", created_at=0.0)))
    await database.write(lambda s: s.add(ApiKeyRow(id="k", name="k", prefix="e2b_", digest="d" * 64, created_at=0.0,
                                                   team_id="team-a")))


async def test_a_failed_flush_records_nothing_and_the_next_records_it_all(tmp_path, monkeypatch):
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")
    await _team_and_key(database)
    await database.write(lambda s: s.add_all([_running_row(1000.0, sandbox_id="a"),
                                              _running_row(1000.0, sandbox_id="b")]))
    meter = Meter(database, Prices(), interval_s=0, clock=lambda: 1100.0)
    real = metering.settle_sandbox
    calls = []

    def failing_on_the_second(session, row, now):
        calls.append(row.id)
        if len(calls) == 2:
            raise OSError("disk full")
        real(session, row, now)

    monkeypatch.setattr(metering, "settle_sandbox", failing_on_the_second)  # flush_all looks it up at each call
    with pytest.raises(OSError):
        await meter.flush()
    assert await _vcpu_s(database) == 0  # the first sandbox's interval went with the failed transaction
    monkeypatch.setattr(metering, "settle_sandbox", real)
    await meter.flush()
    assert await _vcpu_s(database) == pytest.approx(2 * 2 * 100)


async def test_an_interval_over_midnight_is_split_between_the_days(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")
    await _team_and_key(database)
    midnight = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    await database.write(lambda s: s.add(_running_row(midnight - 30)))
    await Meter(database, Prices(), interval_s=0, clock=lambda: midnight + 90).flush()
    days = await database.read(lambda s: {r.day: r.vcpu_s for r in s.scalars(select(UsageDayRow))})
    assert days == {"2025-12-31": pytest.approx(60), "2026-01-01": pytest.approx(180)}


def test_the_price_table_comes_from_the_environment_and_bad_prices_are_refused(monkeypatch):
    monkeypatch.setenv("CORRAL_PRICES", '{"vcpu_hour": 1.5, "build_minute": 0.25}')
    monkeypatch.setenv("CORRAL_CURRENCY", "EUR")
    prices = Prices.from_env()
    assert (prices.vcpu_hour, prices.build_minute, prices.currency) == (1.5, 0.25, "EUR")
    assert prices.memory_gib_hour == Prices().memory_gib_hour
    usage = metering.Usage(vcpu_s=7200, build_min=4)
    assert prices.cost(usage) == pytest.approx(2 * 1.5 + 4 * 0.25)
    for bad in ('{"gpu_hour": 1}', '{"vcpu_hour": -1}', '{"vcpu_hour": "free"}'):
        monkeypatch.setenv("CORRAL_PRICES", bad)
        with pytest.raises(ValueError, match="CORRAL_PRICES"):
            Prices.from_env()


async def test_usage_groups_by_day_template_and_key_with_its_cost(tmp_path):
    prices = Prices(vcpu_hour=3.6, memory_gib_hour=0.0)  # 0.001 per vCPU-second
    async with served(tmp_path, prices) as (http, plane, _, headers):
        sandbox_id = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        await asyncio.sleep(0.3)
        await http.delete(f"/sandboxes/{sandbox_id}", headers=headers)
        report = (await http.get("/usage", params={"groupBy": "day,template,key"}, headers=headers)).json()
        [group] = report["groups"]
        assert group["template"] == TEMPLATE and group["day"] == metering.day_of(time.time())
        assert group["cost"] == pytest.approx(group["vcpuSeconds"] * 0.001)
        assert report["total"]["cost"] == pytest.approx(group["cost"]) and report["currency"] == "USD"
        for bad in ({"groupBy": "colour"}, {"groupBy": "day,day"}, {"start": "yesterday"},
                    {"start": "2026-12-02", "end": "2026-12-01"}):
            answer = await http.get("/usage", params=bad, headers=headers)
            assert answer.status_code == 400, bad
        other_team = {"X-API-KEY": (await ApiKeys(plane._db).create("other"))[1]}
        assert (await http.get("/usage", headers=other_team)).json()["groups"] == []
        assert (await http.get(f"/sandboxes/{sandbox_id}/usage", headers=other_team)).status_code == 404


async def test_spending_warnings_come_in_order_and_the_cap_refuses_creates_until_raised(tmp_path):
    prices = Prices(vcpu_hour=3600.0, memory_gib_hour=0.0, disk_gib_hour=0.0, snapshot_gib_hour=0.0)  # 1/vCPU-s
    async with served(tmp_path, prices) as (http, plane, keys, headers):
        team_id = (await keys.list())[0].team_id
        await keys.update_team(team_id, budget=2.0, warn_at=[50, 80], cap_policy="pause")
        sandbox_id = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        await plane.events.settled()  # the create's own event comes before the subscription
        received = []
        plane.events.subscribe(received.append)
        started = (await plane.sandboxes.row(sandbox_id)).started_at
        plane.meter.clock = lambda: started + 0.6  # 2 vCPUs for 0.6 s: 1.2 spent, 60 %
        await plane.meter.flush()
        await plane.events.settled()
        assert [(e.type, e.data["percent"]) for e in received] == [(events.SPENDING_WARNING, 50)]
        plane.meter.clock = lambda: started + 1.1  # 2.2 spent: past 80 % and the cap
        await plane.meter.flush()
        await plane.events.settled()
        types = [(e.type, e.data.get("percent")) for e in received]
        assert types[:3] == [(events.SPENDING_WARNING, 50), (events.SPENDING_WARNING, 80),
                             (events.CAP_REACHED, 100)]
        # The pause policy paused the running sandbox; creates are refused with the reason.
        assert (await http.get(f"/sandboxes/{sandbox_id}", headers=headers)).json()["state"] == "paused"
        assert any(e.type == events.PAUSED and e.data["reason"] == "spending cap" for e in received)
        refused = await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)
        assert refused.status_code == 403 and "spending cap" in refused.json()["message"]
        spending = (await http.get("/usage/spending", headers=headers)).json()
        assert spending["capReached"] and spending["budget"] == 2.0 and spending["percent"] >= 100
        # A flush later announces nothing again this month.
        count = len(received)
        await plane.meter.flush()
        await plane.events.settled()
        assert len(received) == count
        # Raising the cap lets creates through at once.
        await keys.update_team(team_id, budget=1000.0)
        assert (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).status_code == 201


async def test_lifecycle_events_are_recorded_for_the_team(tmp_path):
    async with served(tmp_path) as (http, plane, _, headers):
        team_id = (await ApiKeys(plane._db).list())[0].team_id
        sandbox_id = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        await http.post(f"/sandboxes/{sandbox_id}/timeout", headers=headers, json={"timeout": 120})
        await http.post(f"/sandboxes/{sandbox_id}/pause", headers=headers)
        await http.post(f"/sandboxes/{sandbox_id}/connect", headers=headers, json={"timeout": 60})
        forked = await http.post(f"/sandboxes/{sandbox_id}/fork", headers=headers, json={"count": 1})
        await http.delete(f"/sandboxes/{sandbox_id}", headers=headers)
        recorded = await plane.events.list(team_id, sandbox_id=sandbox_id)
        assert [e.type for e in recorded] == [events.CREATED, events.UPDATED, events.PAUSED, events.RESUMED,
                                              events.FORKED, events.KILLED]
        assert recorded[-2].data["children"] == [forked.json()[0]["sandbox"]["sandboxID"]]
        assert recorded[-1].data["reason"] == "request"


def test_corral_usage_prints_a_table_or_csv_and_records_running_sandboxes_first(tmp_path, monkeypatch):
    import csv
    import io

    from typer.testing import CliRunner

    from corral.cli.main import app

    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CORRAL_DATABASE_URL", raising=False)
    monkeypatch.setenv("CORRAL_PRICES", '{"vcpu_hour": 36, "memory_gib_hour": 0}')  # 0.01 per vCPU-second, only
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")
    asyncio.run(_team_and_key(database))
    started = time.time() - 100
    asyncio.run(database.write(lambda s: s.add(_running_row(started))))
    database.close()
    result = CliRunner().invoke(app, ["usage", "--by", "team,template", "--csv"])
    assert result.exit_code == 0, result.output
    [row] = list(csv.DictReader(io.StringIO(result.output)))
    assert (row["team"], row["template"]) == ("team-a", "base")
    assert 200 <= float(row["vcpu_s"]) < 210 and float(row["cost_usd"]) == pytest.approx(float(row["vcpu_s"]) * 0.01)
    table = CliRunner().invoke(app, ["usage", "--team", "a"])
    assert table.exit_code == 0 and "total" in table.output and "USD" in table.output
    assert CliRunner().invoke(app, ["usage", "--from", "last week"]).exit_code == 1
    assert CliRunner().invoke(app, ["usage", "--team", "nobody"]).exit_code == 1


async def test_metrics_show_each_teams_usage_and_cost_as_counters(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    async with served(tmp_path) as (http, _, keys, headers):
        team_id = (await keys.list())[0].team_id
        sandbox_id = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        await asyncio.sleep(0.2)
        await http.delete(f"/sandboxes/{sandbox_id}", headers=headers)
        recorded = await total(http, headers)
        samples = {(s.name, s.labels.get("team_id")): s.value
                   for f in text_string_to_metric_families((await http.get("/metrics")).text) for s in f.samples}
        assert samples[("corral_team_vcpu_seconds_total", team_id)] == pytest.approx(recorded["vcpuSeconds"])
        assert samples[("corral_team_memory_gib_seconds_total", team_id)] == pytest.approx(recorded["memoryGiBSeconds"])
        assert samples[("corral_team_cost_total", team_id)] == pytest.approx(recorded["cost"])
        assert recorded["vcpuSeconds"] > 0


async def test_an_oom_kill_in_a_sandbox_is_an_event_once(tmp_path):
    async with served(tmp_path) as (http, plane, keys, headers):
        team_id = (await keys.list())[0].team_id
        sandbox_id = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        address = await plane.orchestrator.reachable_address(sandbox_id)
        envd = plane.orchestrator.envd
        last = {"pid": 42, "command": "python3 hog.py", "rss_mib": 480}
        envd.oom[address] = {"oom_kills": 1, "oom_last": last}
        await plane.sandboxes.sample_once()
        await plane.sandboxes.sample_once()  # nothing new: no second event
        envd.oom[address] = {"oom_kills": 3, "oom_last": {**last, "pid": 43}}
        await plane.sandboxes.sample_once()
        recorded = await plane.events.list(team_id, sandbox_id=sandbox_id, types=[events.OUT_OF_MEMORY])
        assert [(e.data["killed"], e.data["last"]["pid"]) for e in recorded] == [(1, 42), (2, 43)]


async def test_usage_answers_do_not_swallow_the_servers_spending_events_and_a_new_budget_rearms_them(tmp_path):
    prices = Prices(vcpu_hour=3600.0, memory_gib_hour=0.0, disk_gib_hour=0.0, snapshot_gib_hour=0.0)  # 1/vCPU-s
    async with served(tmp_path, prices) as (http, plane, keys, headers):
        team_id = (await keys.list())[0].team_id
        await keys.update_team(team_id, budget=2.0, warn_at=[50])
        sandbox_id = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        started = (await plane.sandboxes.row(sandbox_id)).started_at
        await plane.events.settled()
        received = []
        plane.events.subscribe(received.append)
        await asyncio.sleep(1.1)  # real time: 2 vCPUs past the cap
        assert (await http.get("/usage/spending", headers=headers)).json()["spent"] > 2.0  # a usage answer's flush
        assert received == []  # announces nothing: the server's own flush does
        plane.meter.clock = lambda: started + 1.2
        await plane.meter.flush()
        assert [(e.type, e.data["percent"]) for e in received] == [(events.SPENDING_WARNING, 50),
                                                                   (events.CAP_REACHED, 100)]
        # Raising the budget re-arms its thresholds: crossing them again announces again.
        await keys.update_team(team_id, budget=3.0)
        plane.meter.clock = lambda: started + 1.6  # 3.2 spent of 3
        await plane.meter.flush()
        assert [(e.type, e.data["budget"]) for e in received[2:]] == [(events.SPENDING_WARNING, 3.0),
                                                                       (events.CAP_REACHED, 3.0)]


async def test_at_the_cap_sandboxes_are_not_extended_nor_resumed_by_traffic(tmp_path):
    prices = Prices(vcpu_hour=3600.0, memory_gib_hour=0.0, disk_gib_hour=0.0, snapshot_gib_hour=0.0)
    async with served(tmp_path, prices) as (http, plane, keys, headers):
        team_id = (await keys.list())[0].team_id
        running = (await http.post("/sandboxes", headers=headers, json=NEW_SANDBOX)).json()["sandboxID"]
        lifecycle = {**NEW_SANDBOX, "autoPause": True, "autoResume": {"enabled": True}}
        paused = (await http.post("/sandboxes", headers=headers, json=lifecycle)).json()["sandboxID"]
        assert (await http.post(f"/sandboxes/{paused}/pause", headers=headers)).status_code == 204
        await keys.update_team(team_id, budget=0.5, cap_policy="finish")
        await asyncio.sleep(0.3)
        await plane.meter.flush()  # 2 vCPUs for 0.3 s: past the cap
        end = (await plane.sandboxes.row(running)).end_at
        longer = await http.post(f"/sandboxes/{running}/timeout", headers=headers, json={"timeout": 3600})
        assert longer.status_code == 403 and "spending cap" in longer.json()["message"]
        connected = await http.post(f"/sandboxes/{running}/connect", headers=headers, json={"timeout": 3600})
        assert connected.status_code in (200, 201)  # a connect still connects, without extending
        assert (await plane.sandboxes.row(running)).end_at == end
        assert await plane.branching.auto_resume(paused) is False
        assert (await plane.sandboxes.row(paused)).state == "paused"
        await keys.update_team(team_id, budget=1000.0)
        await plane.meter.flush()
        assert await plane.branching.auto_resume(paused) is True
