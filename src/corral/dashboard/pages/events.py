"""The events page: the team's lifecycle and operations events, newest first (polled every 3 s), and each
of its webhooks with its latest delivery attempts. Reads the same functions as GET /events and
GET /events/webhooks/{id}/deliveries."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.control.api_webhooks import masked_url
from corral.control.scopes import ADMIN
from corral.control.webhooks import event_payload
from corral.dashboard.web import Dashboard, Viewer, signed_in

EVENTS_SHOWN = 100
DELIVERIES_SHOWN = 20


def event_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()
    plane = dash.plane

    async def events_context(viewer: Viewer, kind: str) -> dict:
        rows = await plane.events.list(viewer.key.team_id, limit=EVENTS_SHOWN, newest_first=True,
                                       types=[kind] if kind else None)
        return dict(events=[(row, event_payload(row)) for row in rows], kind=kind)

    @router.get("/events")
    async def page(request: Request, viewer: Viewer = Depends(signed_in), kind: str = "") -> Response:
        hooks = []
        if plane.webhooks is not None:
            for hook in await plane.webhooks.list(viewer.key.owner):
                deliveries = await plane.webhooks.deliveries(viewer.key.owner, hook.id, limit=DELIVERIES_SHOWN)
                # As the API answers: what the receiver answered (an excerpt) only to admin keys.
                hooks.append((hook, [(d, d.error if viewer.can(ADMIN) or d.response_status is None else None)
                                     for d in deliveries]))
        types = sorted({row.type for row, _ in (await events_context(viewer, ""))["events"]})
        # As GET /events/webhooks answers: the full URL (it may carry a token) only to admin keys.
        shown_url = (lambda url: url) if viewer.can(ADMIN) else masked_url
        return dash.render(request, "events.html", viewer, title="Events", hooks=hooks, types=types,
                           shown_url=shown_url,
                           **await events_context(viewer, kind))

    @router.get("/events/list")
    async def events_list(request: Request, viewer: Viewer = Depends(signed_in), kind: str = "") -> Response:
        return dash.render(request, "_events_list.html", viewer, **await events_context(viewer, kind))

    return router
