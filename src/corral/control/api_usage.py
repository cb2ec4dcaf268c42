"""Routes for usage and spending (Corral's own; E2B shows these only in its dashboard): the team's usage by
day, month, template or key with its cost, this month's spending against the cap, and one sandbox's usage.
Each answer is current: the usage of running sandboxes is recorded up to the request first."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from corral.control.api_common import ERRORS, Key, iso
from corral.control.errors import ApiError
from corral.control.metering import QUANTITIES, Meter, Usage


class UsageFigures(BaseModel):
    vcpuSeconds: float
    memoryGiBSeconds: float
    diskGiBHours: float
    snapshotGiBHours: float
    buildMinutes: float
    cost: float


class UsageGroup(UsageFigures):
    day: str | None = None
    month: str | None = None
    template: str | None = None
    keyID: str | None = None


class UsageReport(BaseModel):
    currency: str
    prices: dict[str, float | str]
    start: str | None
    end: str | None
    groupBy: list[str]
    groups: list[UsageGroup]
    total: UsageFigures


class SpendingReport(BaseModel):
    month: str = Field(description="YYYY-MM, UTC")
    spent: float
    currency: str
    budget: float | None = Field(description="The monthly cap; null: none")
    percent: float | None
    warnAt: list[float] = Field(description="Percentages of the budget that raise a team.spending.warning event")
    capPolicy: str = Field(description="At the cap, running sandboxes 'finish' or are 'pause'd")
    capReached: bool


class SandboxUsage(UsageFigures):
    sandboxID: str
    templateID: str
    keyID: str
    vcpus: float
    memoryMB: int
    runningSeconds: float
    firstAt: str
    lastAt: str


_GROUPS = ("day", "month", "template", "key")


def _figures(values: dict, cost: float) -> dict:
    return {"vcpuSeconds": values["vcpu_s"], "memoryGiBSeconds": values["memory_gib_s"],
            "diskGiBHours": values["disk_gib_h"], "snapshotGiBHours": values["snapshot_gib_h"],
            "buildMinutes": values["build_min"], "cost": cost}


def _day(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ApiError(400, f"{name} must be a day such as 2026-12-01, got {value!r}") from None


def usage_routes(meter_of) -> APIRouter:
    """`meter_of()`: the plane's meter."""
    router = APIRouter(tags=["usage"])

    @router.get("/usage", response_model=UsageReport, responses=ERRORS)
    async def usage(key: Key,
                    start: Annotated[str | None, Query(description="First UTC day, YYYY-MM-DD")] = None,
                    end: Annotated[str | None, Query(description="Last UTC day, YYYY-MM-DD (included)")] = None,
                    groupBy: Annotated[str, Query(description="Comma-separated: day, month, template, key; "
                                                              "empty: one total")] = "day",
                    keyID: Annotated[str | None, Query(description="Only this key's usage")] = None,
                    template: Annotated[str | None, Query(description="Only this template's usage")] = None,
                    ) -> UsageReport:
        groups = tuple(g.strip() for g in groupBy.split(",") if g.strip())
        unknown = [g for g in groups if g not in _GROUPS]
        if unknown or len(set(groups)) != len(groups):
            raise ApiError(400, f"groupBy takes distinct values of {', '.join(_GROUPS)}; got {groupBy!r}")
        first, last = _day(start, "start"), _day(end, "end")
        if first and last and first > last:
            raise ApiError(400, f"start {first} is after end {last}")
        meter: Meter = meter_of()
        await meter.flush(record_only=True)
        rows = await meter.usage(key.team_id, start_day=first, end_day=last,
                                 group_by=tuple("key" if g == "key" else g for g in groups), key_id=keyID,
                                 template=template)
        total = Usage()
        answer = []
        for row in rows:
            total.add(Usage(*(row[q] for q in QUANTITIES)))
            answer.append(UsageGroup(**_figures(row, row["cost"]), day=row.get("day"), month=row.get("month"),
                                     template=row.get("template"), keyID=row.get("key")))
        return UsageReport(currency=meter.prices.currency, prices=meter.prices.as_dict(), start=first, end=last,
                           groupBy=list(groups), groups=answer,
                           total=UsageFigures(**_figures(total.__dict__, meter.prices.cost(total))))

    @router.get("/usage/spending", response_model=SpendingReport, responses=ERRORS)
    async def spending(key: Key) -> SpendingReport:
        meter: Meter = meter_of()
        await meter.flush(record_only=True)
        found = await meter.spending(key.team_id)
        return SpendingReport(month=found.month, spent=found.spent, currency=meter.prices.currency,
                              budget=found.budget, percent=found.percent, warnAt=list(found.warn_at),
                              capPolicy=found.cap_policy, capReached=found.capped)

    @router.get("/sandboxes/{sandbox_id}/usage", response_model=SandboxUsage, responses=ERRORS)
    async def sandbox_usage(sandbox_id: str, key: Key) -> SandboxUsage:
        meter: Meter = meter_of()
        await meter.flush(record_only=True)
        row = await meter.sandbox_usage(sandbox_id)
        if row is None or row.team_id != key.team_id:
            raise ApiError(404, f"no usage of a sandbox {sandbox_id} of this team")
        values = {q: getattr(row, q, 0.0) for q in QUANTITIES}
        values["build_min"] = 0.0
        return SandboxUsage(**_figures(values, meter.prices.cost(Usage(**values))), sandboxID=row.sandbox_id,
                            templateID=row.template, keyID=row.key_id, vcpus=row.vcpus, memoryMB=row.memory_mb,
                            runningSeconds=row.running_s, firstAt=iso(row.first_at), lastAt=iso(row.last_at))

    return router
