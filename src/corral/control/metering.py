"""Usage metering, its cost, and teams' spending caps.

What is metered (allocated, not used: what a sandbox holds is what it costs the machine):
  - running sandboxes: vCPU-seconds and memory GiB-seconds, disk GiB-hours of their allocated disk;
  - checkpoints (pauses, snapshots, fork points): snapshot GiB-hours of their files, while they exist;
  - template builds: minutes from start to end.

Exactly once, also over crashes: each running sandbox and each checkpoint carries `metered_at`, the time up
to which its usage is recorded. Recording an interval adds it to the day's totals and moves `metered_at` in
the same transaction, so a crash loses no recorded usage and nothing is counted twice; usage after the last
flush is recorded by the next one, by whichever server (or `corral usage`) runs it. A sandbox's state
changes (pause, kill) settle its interval in the transaction that changes it. Sandboxes keep running while
the server is down (they are adopted at restart), so that time is theirs and is metered at the next flush;
a sandbox found gone at restart is metered only up to its last flush (its end is unknown).

Cost = usage x the price table (`CORRAL_PRICES`, JSON; defaults below, in `CORRAL_CURRENCY`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.control import events
from corral.control.db import (
    CheckpointRow,
    Database,
    EventRow,
    SandboxRow,
    SandboxUsageRow,
    TeamRow,
    TemplateBuildRow,
    TemplateRow,
    UsageDayRow,
)

log = logging.getLogger("corral.metering")

GIB_MB = 1024
GIB = 1 << 30
DEFAULT_WARN_AT = (50.0, 80.0, 100.0)
# Usage answers record what ran up to the request first, but at most this often: a client asking again and
# again does not make the server rewrite every sandbox's usage each time.
RECORD_INTERVAL_S = 0.25
QUANTITIES = ("vcpu_s", "memory_gib_s", "disk_gib_h", "snapshot_gib_h", "build_min")


@dataclass(frozen=True)
class Prices:
    """Per unit, in `currency`. CPU and memory default to E2B's published per-second prices."""

    vcpu_hour: float = 0.0504
    memory_gib_hour: float = 0.0162
    disk_gib_hour: float = 0.0
    snapshot_gib_hour: float = 0.0001
    build_minute: float = 0.0
    currency: str = "USD"

    @classmethod
    def from_env(cls) -> Prices:
        raw = os.environ.get("CORRAL_PRICES", "").strip()
        values = json.loads(raw) if raw else {}
        known = {f.name for f in fields(cls)} - {"currency"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"CORRAL_PRICES: unknown price(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(known))}")
        if any(not isinstance(v, int | float) or v < 0 for v in values.values()):
            raise ValueError("CORRAL_PRICES: prices are numbers of at least 0")
        return cls(**values, currency=os.environ.get("CORRAL_CURRENCY", "USD"))

    def cost(self, usage: Usage) -> float:
        return (usage.vcpu_s / 3600 * self.vcpu_hour + usage.memory_gib_s / 3600 * self.memory_gib_hour
                + usage.disk_gib_h * self.disk_gib_hour + usage.snapshot_gib_h * self.snapshot_gib_hour
                + usage.build_min * self.build_minute)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Usage:
    vcpu_s: float = 0.0
    memory_gib_s: float = 0.0
    disk_gib_h: float = 0.0
    snapshot_gib_h: float = 0.0
    build_min: float = 0.0

    def add(self, other) -> None:
        for name in QUANTITIES:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Spending:
    team_id: str
    month: str  # YYYY-MM, UTC
    spent: float
    budget: float | None
    warn_at: tuple[float, ...]
    cap_policy: str

    @property
    def percent(self) -> float | None:
        return None if not self.budget else 100.0 * self.spent / self.budget

    @property
    def capped(self) -> bool:
        return self.budget is not None and self.spent >= self.budget


@dataclass
class _Crossings:
    """What a flush found: the spending events it recorded, the teams at their cap."""

    events: list[EventRow] = field(default_factory=list)
    capped: list[Spending] = field(default_factory=list)


def day_of(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def month_of(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m")


def _day_spans(start: float, end: float):
    """(day, seconds) of [start, end) split at UTC midnights."""
    while start < end:
        day = dt.datetime.fromtimestamp(start, dt.UTC)
        midnight = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
        stop = min(end, midnight.timestamp())
        yield day.strftime("%Y-%m-%d"), stop - start
        start = stop


def _bucket(session: Session, team_id: str, key_id: str, template: str, day: str) -> UsageDayRow:
    row = session.scalar(select(UsageDayRow).where(UsageDayRow.team_id == team_id, UsageDayRow.key_id == key_id,
                                                   UsageDayRow.template == template, UsageDayRow.day == day))
    if row is None:
        row = UsageDayRow(team_id=team_id, key_id=key_id, template=template, day=day, vcpu_s=0.0, memory_gib_s=0.0,
                          disk_gib_h=0.0, snapshot_gib_h=0.0, build_min=0.0)
        session.add(row)
    return row


def _sandbox_usage(session: Session, sandbox_id: str, team_id: str, key_id: str, template: str, vcpus: float,
                   memory_mb: int, at: float) -> SandboxUsageRow:
    row = session.get(SandboxUsageRow, sandbox_id)
    if row is None:
        row = SandboxUsageRow(sandbox_id=sandbox_id, team_id=team_id, key_id=key_id, template=template, vcpus=vcpus,
                              memory_mb=memory_mb, first_at=at, last_at=at, running_s=0.0, vcpu_s=0.0,
                              memory_gib_s=0.0, disk_gib_h=0.0, snapshot_gib_h=0.0)
        session.add(row)
    return row


def settle_sandbox(session: Session, row: SandboxRow, now: float) -> None:
    """Records a running sandbox's usage from `metered_at` (or its start) to `now`, in the caller's
    transaction, and moves `metered_at` to `now`."""
    start = row.metered_at if row.metered_at is not None else row.started_at
    team_id = row.team_id or row.key_id
    if now > start:
        for day, seconds in _day_spans(start, now):
            bucket = _bucket(session, team_id, row.key_id, row.template, day)
            bucket.vcpu_s += row.vcpus * seconds
            bucket.memory_gib_s += row.memory_mb / GIB_MB * seconds
            bucket.disk_gib_h += row.disk_mb / GIB_MB * seconds / 3600
        total = _sandbox_usage(session, row.id, team_id, row.key_id, row.template, row.vcpus, row.memory_mb, start)
        seconds = now - start
        total.running_s += seconds
        total.vcpu_s += row.vcpus * seconds
        total.memory_gib_s += row.memory_mb / GIB_MB * seconds
        total.disk_gib_h += row.disk_mb / GIB_MB * seconds / 3600
        total.last_at = max(total.last_at, now)
    row.metered_at = max(now, start)


def settle_checkpoint(session: Session, node: CheckpointRow, now: float) -> None:
    """Records a checkpoint's storage from `metered_at` (or its making) to `now`; moves `metered_at`."""
    start = node.metered_at if node.metered_at is not None else node.created_at
    if now > start and node.size_bytes:
        team_id = node.team_id or node.key_id
        gib = node.size_bytes / GIB
        for day, seconds in _day_spans(start, now):
            _bucket(session, team_id, node.key_id, node.template, day).snapshot_gib_h += gib * seconds / 3600
        total = session.get(SandboxUsageRow, node.sandbox_id)
        if total is not None:
            total.snapshot_gib_h += gib * (now - start) / 3600
    node.metered_at = max(now, start)


def _settle_builds(session: Session) -> None:
    builds = session.execute(
        select(TemplateBuildRow, TemplateRow).join(TemplateRow, TemplateRow.id == TemplateBuildRow.template_id)
        .where(TemplateBuildRow.metered.is_not(True), TemplateBuildRow.finished_at.is_not(None),
               TemplateBuildRow.started_at.is_not(None)))
    for build, template in builds:
        minutes = max(0.0, build.finished_at - build.started_at) / 60
        _bucket(session, template.team_id or template.key_id, template.key_id, template.name,
                day_of(build.finished_at)).build_min += minutes
        build.metered = True


def flush_all(session: Session, now: float) -> None:
    """Records every running sandbox's and every checkpoint's usage up to `now`, and finished builds."""
    for row in session.scalars(select(SandboxRow).where(SandboxRow.state == "running")):
        settle_sandbox(session, row, now)
    for node in session.scalars(select(CheckpointRow).where(CheckpointRow.ready.is_(True))):
        settle_checkpoint(session, node, now)
    _settle_builds(session)


def month_usage(session: Session, team_id: str, month: str) -> Usage:
    totals = session.execute(select(*(func.coalesce(func.sum(getattr(UsageDayRow, q)), 0.0) for q in QUANTITIES))
                             .where(UsageDayRow.team_id == team_id, UsageDayRow.day.startswith(month + "-"))).one()
    return Usage(*totals)


class Meter:
    """Flushes usage every `interval_s`, keeps each team's month-to-date spending for admission, records
    spending thresholds and caps as events, and pauses capped teams' sandboxes under the "pause" policy."""

    def __init__(self, database: Database, prices: Prices, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = database
        self.prices = prices
        self._interval_s = interval_s
        self.clock = clock
        self._spent: dict[str, float] = {}  # team -> this month's cost at the last flush
        self._task: asyncio.Task | None = None
        self._recorded_at = -1e9  # time.monotonic() of the last flush
        # Set by the control plane: published(events) hands recorded events to their listeners;
        # pause_team(team_id) pauses a team's running sandboxes.
        self.published: Callable[[list[EventRow]], None] | None = None
        self.pause_team: Callable[[str], Awaitable[None]] | None = None

    def start(self) -> None:
        if self._interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def spent(self, team_id: str) -> float:
        """This month's cost of the team as of the last flush (0 before the first)."""
        return self._spent.get(team_id, 0.0)

    async def flush(self, *, record_only: bool = False) -> None:
        """Records usage up to now. The server's own flushes (`record_only=False`: its loop and its start)
        also update each team's spending, record the warnings and cap events of thresholds crossed in the
        same transaction (so each is recorded exactly once, whoever flushed the usage before), and pause
        the running sandboxes of every team at its cap under the "pause" policy, on every flush while it
        stays there. `record_only` flushes (before a usage answer, `corral usage`) record usage alone, at
        most one every `RECORD_INTERVAL_S` (usage answers are then at most that stale)."""
        if record_only:
            if time.monotonic() - self._recorded_at < RECORD_INTERVAL_S:
                return
            now = self.clock()
            await self._db.write(lambda session: flush_all(session, now))
            self._recorded_at = time.monotonic()
            return
        now = self.clock()
        crossings = await self._db.write(lambda session: self._flush(session, now))
        self._recorded_at = time.monotonic()
        if crossings.events and self.published is not None:
            self.published(crossings.events)
        if self.pause_team is not None:
            for spending in crossings.capped:
                if spending.cap_policy == "pause":
                    await self.pause_team(spending.team_id)

    def _flush(self, session: Session, now: float) -> _Crossings:
        flush_all(session, now)
        month = month_of(now)
        crossings = _Crossings()
        spent: dict[str, float] = {}
        for team in session.scalars(select(TeamRow)):
            cost = self.prices.cost(month_usage(session, team.id, month))
            spent[team.id] = cost
            if not team.budget:
                continue
            spending = Spending(team.id, month, cost, team.budget, tuple(team.warn_at or DEFAULT_WARN_AT),
                                team.cap_policy or "finish")
            if spending.capped:
                crossings.capped.append(spending)
            # What was announced this month under this budget (a change of budget or thresholds clears it).
            warned = dict(team.warned or {})
            sent = set(warned.get("sent", [])) if warned.get("month") == month else set()
            percent = spending.percent or 0.0
            new = sorted(p for p in spending.warn_at if p <= percent + 1e-9 and p not in sent)
            for threshold in new:
                crossings.events.append(self._event(session, spending, events.SPENDING_WARNING, threshold, now))
            if spending.capped and "cap" not in sent:
                crossings.events.append(self._event(session, spending, events.CAP_REACHED, 100.0, now))
                new.append("cap")
            if new:
                team.warned = {"month": month, "sent": sorted(sent | set(new), key=str)}
        self._spent = spent
        return crossings

    def _event(self, session: Session, spending: Spending, type: str, percent: float, now: float) -> EventRow:
        row = EventRow(event_id=str(uuid.uuid4()), team_id=spending.team_id, sandbox_id=None, type=type, ts=now,
                       data={"percent": percent, "spent": round(spending.spent, 6), "budget": spending.budget,
                             "currency": self.prices.currency, "month": spending.month,
                             "capPolicy": spending.cap_policy})
        session.add(row)
        return row

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except Exception:
                log.exception("metering flush failed; the next one records the same usage")

    # --- reading -----------------------------------------------------------------------------------

    async def usage(self, team_id: str | None, *, start_day: str | None = None, end_day: str | None = None,
                    group_by: tuple[str, ...] = ("day",), key_id: str | None = None,
                    template: str | None = None) -> list[dict]:
        """Usage and its cost per group (any of day, month, template, key, team) in [start_day, end_day]."""
        columns = {"day": UsageDayRow.day, "month": func.substr(UsageDayRow.day, 1, 7),
                   "template": UsageDayRow.template, "key": UsageDayRow.key_id, "team": UsageDayRow.team_id}
        unknown = set(group_by) - set(columns)
        if unknown:
            raise ValueError(f"groupBy takes {', '.join(columns)}; not {', '.join(sorted(unknown))}")
        keys = [columns[g].label(g) for g in group_by]
        stmt = select(*keys, *(func.sum(getattr(UsageDayRow, q)).label(q) for q in QUANTITIES))
        if team_id is not None:
            stmt = stmt.where(UsageDayRow.team_id == team_id)
        if start_day:
            stmt = stmt.where(UsageDayRow.day >= start_day)
        if end_day:
            stmt = stmt.where(UsageDayRow.day <= end_day)
        if key_id:
            stmt = stmt.where(UsageDayRow.key_id == key_id)
        if template:
            stmt = stmt.where(UsageDayRow.template == template)
        if keys:
            stmt = stmt.group_by(*keys).order_by(*keys)
        rows = await self._db.read(lambda session: list(session.execute(stmt)))
        answer = []
        for row in rows:
            usage = Usage(*(getattr(row, q) or 0.0 for q in QUANTITIES))
            if not any(getattr(usage, q) for q in QUANTITIES):
                continue
            answer.append({**{g: getattr(row, g) for g in group_by}, **usage.__dict__,
                           "cost": self.prices.cost(usage)})
        return answer

    async def spending(self, team_id: str) -> Spending:
        now = self.clock()
        month = month_of(now)

        def read(session: Session) -> Spending:
            team = session.get(TeamRow, team_id)
            cost = self.prices.cost(month_usage(session, team_id, month))
            return Spending(team_id, month, cost, team.budget if team else None,
                            tuple(team.warn_at or DEFAULT_WARN_AT) if team else DEFAULT_WARN_AT,
                            (team.cap_policy if team else None) or "finish")

        return await self._db.read(read)

    async def sandbox_usage(self, sandbox_id: str) -> SandboxUsageRow | None:
        return await self._db.read(lambda session: session.get(SandboxUsageRow, sandbox_id))

