"""Placeholders for the pages not built yet (web.NAV marks them `coming`): each says what it will show."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.dashboard.web import NAV, Dashboard, NavItem, Viewer, signed_in

# What each NAV item marked `coming` will show (none is, now).
PLANS: dict[str, str] = {}


def coming_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()

    def placeholder(item: NavItem):
        async def page(request: Request, viewer: Viewer = Depends(signed_in)) -> Response:
            return dash.render(request, "coming.html", viewer, title=item.label, plan=PLANS.get(item.path, ""))
        return page

    for item in NAV:
        if item.coming:
            router.add_api_route(item.path, placeholder(item), methods=["GET"])
    return router
