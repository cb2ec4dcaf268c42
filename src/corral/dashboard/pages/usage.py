"""The usage and spending page: the team's cost per day by template and by key over the last 30 days (charts
drawn by uPlot from JSON in the page, with the same figures as tables), and this month's spending against the
team's cap with its warning thresholds. The figures are the meter's (control/metering.py), as GET /usage and
GET /usage/spending answer them."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.dashboard.web import Dashboard, Viewer, signed_in

DAYS = 30


def _series(rows: list[dict], days: list[str], group: str, names: dict[str, str] | None = None) -> dict:
    """Cost per day for each value of `group`, every day present (0 without usage), for one chart."""
    by_value: dict[str, dict[str, float]] = {}
    for row in rows:
        by_value.setdefault(row[group], {})[row["day"]] = row["cost"]
    ordered = sorted(by_value, key=lambda v: -sum(by_value[v].values()))
    return {"x": [dt.datetime.fromisoformat(d).replace(tzinfo=dt.UTC).timestamp() for d in days],
            "series": [{"label": (names or {}).get(v, v), "values": [by_value[v].get(d, 0.0) for d in days]}
                       for v in ordered]}


def _totals(rows: list[dict], group: str, names: dict[str, str] | None = None) -> list[dict]:
    totals: dict[str, dict] = {}
    for row in rows:
        entry = totals.setdefault(row[group], {"name": (names or {}).get(row[group], row[group]), "cost": 0.0,
                                               "vcpu_h": 0.0, "memory_gib_h": 0.0})
        entry["cost"] += row["cost"]
        entry["vcpu_h"] += row["vcpu_s"] / 3600
        entry["memory_gib_h"] += row["memory_gib_s"] / 3600
    return sorted(totals.values(), key=lambda t: -t["cost"])


def usage_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()

    @router.get("/usage")
    async def page(request: Request, viewer: Viewer = Depends(signed_in)) -> Response:
        meter = dash.plane.meter
        await meter.flush(record_only=True)  # running sandboxes' usage up to now, as GET /usage does
        today = dt.datetime.now(dt.UTC).date()
        days = [(today - dt.timedelta(days=n)).isoformat() for n in range(DAYS - 1, -1, -1)]
        team = viewer.key.team_id
        by_template = await meter.usage(team, start_day=days[0], group_by=("day", "template"))
        by_key = await meter.usage(team, start_day=days[0], group_by=("day", "key"))
        key_names = {k.id: f"{k.name} ({k.prefix}…)" for k in await dash.keys.list(team)}
        spending = await meter.spending(team)
        currency = meter.prices.currency
        return dash.render(
            request, "usage.html", viewer, title="Usage", days=days, currency=currency, spending=spending,
            chart_template={**_series(by_template, days, "template"), "unit": currency},
            chart_key={**_series(by_key, days, "key", key_names), "unit": currency},
            totals_template=_totals(by_template, "template"), totals_key=_totals(by_key, "key", key_names),
            total=sum(r["cost"] for r in by_template), prices=meter.prices)

    return router
