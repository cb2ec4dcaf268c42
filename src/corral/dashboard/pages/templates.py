"""The templates page: the built-in templates, the team's own with their builds (status, when, how long,
resources, the tags pointing at each) and a page per build with its log, following while it runs. Reads
through the control plane's Templates with the viewer's owner (another team's template or build is 404)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.control.errors import ApiError
from corral.control.templates import DEFAULT_TAG
from corral.dashboard.web import Dashboard, Refused, Viewer, signed_in

FINISHED = ("ready", "error")
# What the built-in templates are, for a person choosing one (src/corral/templates/builtin.py builds them).
BUILTIN_ABOUT = {
    "base": "Debian with envd: commands, files, PTYs. The default template.",
    "code-interpreter-v1": "Jupyter-compatible code interpreter (Python, JavaScript, R, Bash, Java) for "
                           "e2b-code-interpreter.",
    "desktop": "An X11 desktop (Xfce) with a browser, for e2b-desktop: screenshots, input, the live stream.",
    "mcp-gateway": "MCP servers behind one Streamable HTTP gateway, for E2B's MCP support.",
}
LOG_PAGE = 500  # log entries sent at once


def template_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()
    plane = dash.plane

    def templates():
        if plane.templates is None:
            raise Refused(404, "This server builds no templates.")
        return plane.templates

    @router.get("/templates")
    async def page(request: Request, viewer: Viewer = Depends(signed_in)) -> Response:
        own = []
        builtin = []
        if plane.templates is not None:
            builtin = sorted(plane.templates.builtin())
            for row, builds, tags in await plane.templates.list(viewer.key.owner):
                tags_of: dict[str, list[str]] = {}
                for t in sorted(tags, key=lambda t: (t.tag != DEFAULT_TAG, t.tag)):
                    tags_of.setdefault(t.build_id, []).append(t.tag)
                own.append(dict(row=row, builds=list(reversed(builds)), tags_of=tags_of,
                                tags=sorted(t.tag for t in tags),
                                building=any(b.status not in FINISHED for b in builds)))
        return dash.render(request, "templates.html", viewer, title="Templates", own=own, builtin=builtin,
                           about=BUILTIN_ABOUT, now=time.time(),
                           live=any(t["building"] for t in own))

    async def build_of(viewer: Viewer, template_id: str, build_id: str):
        try:
            row = await templates().get(viewer.key.owner, template_id)
            return row, await templates().build_row(viewer.key.owner, template_id, build_id)
        except ApiError as e:
            raise Refused(e.status, e.message) from None

    @router.get("/templates/{template_id}/builds/{build_id}")
    async def build_page(request: Request, template_id: str, build_id: str,
                         viewer: Viewer = Depends(signed_in)) -> Response:
        row, build = await build_of(viewer, template_id, build_id)
        tags = [t.tag for t in await templates().tags(viewer.key.owner, row.id) if t.build_id == build.id]
        return dash.render(request, "template_build.html", viewer, title=f"Build of {row.name}", t=row, b=build,
                           tags=tags, now=time.time(), finished=FINISHED)

    @router.get("/templates/{template_id}/builds/{build_id}/logs")
    async def build_logs(request: Request, template_id: str, build_id: str, viewer: Viewer = Depends(signed_in),
                         offset: int = 0) -> Response:
        """The entries after `offset`, appended to the page's log; the poller goes on while the build runs."""
        row, build = await build_of(viewer, template_id, build_id)
        answer = templates().status(build, max(0, offset), LOG_PAGE, None)
        entries = answer["logEntries"]
        return dash.render(request, "_template_build_logs.html", viewer, t=row, b=build, entries=entries,
                           offset=max(0, offset) + len(entries), more=len(entries) == LOG_PAGE,
                           finished=FINISHED)

    return router
