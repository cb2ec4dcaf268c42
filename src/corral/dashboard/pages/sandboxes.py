"""The sandboxes page: the team's sandboxes as a live table (htmx polls `/sandboxes/table` every second) with
CPU and memory sparklines from the samples the server keeps, filters, and the actions kill, pause, resume,
extend, fork and snapshot, each calling the control-plane function the REST route calls, with the same scope
(`changing(SANDBOXES)`) and the same key limits."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from markupsafe import Markup, escape

from corral.control.db import SandboxRow
from corral.control.errors import to_http
from corral.control.keys import check_timeout
from corral.control.sandboxes import ListQuery
from corral.control.scopes import SANDBOXES
from corral.dashboard.web import Dashboard, Viewer, changing, signed_in

STATES = ("running", "paused")
SPARK_SAMPLES = 24  # the newest samples drawn in a row's sparklines
SPARK_W, SPARK_H = 72, 22
EXTEND_S = 300  # what "+5 min" adds to a sandbox's time left
PAGE_SIZE = 100  # rows a page of the table shows (and htmx redraws every second)


@dataclass(frozen=True)
class Filters:
    state: str = ""  # "", running, paused
    template: str = ""
    metadata: str = ""  # key=value pairs, separated by commas or spaces
    page: int = 1

    def pairs(self) -> dict[str, str]:
        """The metadata filter's pairs; raises ValueError naming a malformed one."""
        found = {}
        for part in self.metadata.replace(",", " ").split():
            name, sep, value = part.partition("=")
            if not sep or not name:
                raise ValueError(f"metadata filters are key=value pairs; {part!r} is not one")
            found[name] = value
        return found


NO_SAMPLES = Markup('<span class="muted" aria-label="no samples yet">—</span>')


def spark_svg(values: list[float], label: str, kind: str) -> Markup:
    """A sparkline of `values` (0..1, oldest first) as inline SVG with its label for screen readers, and the
    newest value; drawn here rather than in the template, which would take as long as the rest of a row."""
    if not values:
        return NO_SAMPLES
    values = values[-SPARK_SAMPLES:]
    if len(values) == 1:  # one sample so far: a short level line, not an invisible point
        values = values * 2
    step = SPARK_W / (SPARK_SAMPLES - 1)
    x0 = SPARK_W - step * (len(values) - 1)
    span = SPARK_H - 2
    points = " ".join(f"{x0 + i * step:.0f},{SPARK_H - 1 - min(1.0, max(0.0, v)) * span:.0f}"
                      for i, v in enumerate(values))
    label = escape(label)
    return Markup(f'<span class="spark-cell"><svg class="spark {kind}" width="{SPARK_W}" height="{SPARK_H}" '
                  f'viewBox="0 0 {SPARK_W} {SPARK_H}" role="img" aria-label="{label}"><title>{label}</title>'
                  f'<polyline points="{points}"/></svg><span class="spark-val">{round(values[-1] * 100)}%</span>'
                  f'</span>')


def sparks(samples: list[tuple[float, float, int, int, int]]) -> tuple[Markup, Markup]:
    """The CPU and memory sparklines of (ts, cpu_used_pct, mem_used, mem_total, cpu_count) samples."""
    if not samples:
        return NO_SAMPLES, NO_SAMPLES
    _, cpu_pct, mem_used, mem_total, cpus = samples[-1]
    cpu = spark_svg([s[1] / 100 for s in samples], f"CPU {cpu_pct:.0f}% of {cpus} vCPU", "cpu")
    memory = spark_svg([s[2] / s[3] if s[3] else 0.0 for s in samples],
                       f"memory {mem_used / 2**20:.0f} of {mem_total / 2**20:.0f} MiB", "mem")
    return cpu, memory


def sandbox_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()
    plane = dash.plane

    async def table_context(viewer: Viewer, filters: Filters) -> dict:
        rows = await plane.sandboxes.list(viewer.key.owner, ListQuery(metadata={}, states=set(STATES)))
        templates = sorted({r.template for r in rows})
        problem = None
        try:
            wanted = filters.pairs()
        except ValueError as e:
            wanted, problem = {}, str(e)
        shown = [r for r in rows if (not filters.state or r.state == filters.state)
                 and (not filters.template or r.template == filters.template)
                 and all((r.sandbox_metadata or {}).get(k) == v for k, v in wanted.items())]
        pages = max(1, -(-len(shown) // PAGE_SIZE))
        page = min(max(1, filters.page), pages)
        first = (page - 1) * PAGE_SIZE
        matching, shown = len(shown), shown[first:first + PAGE_SIZE]
        now = time.time()
        window = SPARK_SAMPLES * max(1.0, plane.settings.metrics_interval_s) * 1.5
        samples = await plane.sandboxes.recent_metrics(viewer.key.owner, [r.id for r in shown if r.state == "running"],
                                                       now - window)
        return dict(rows=shown, sparks={r.id: sparks(samples.get(r.id, [])) for r in shown}, now=now,
                    templates=templates, filters=filters, problem=problem, total=len(rows),
                    matching=matching, page=page, pages=pages, first=first,
                    running=sum(r.state == "running" for r in rows), paused=sum(r.state == "paused" for r in rows),
                    can_act=viewer.can(SANDBOXES), spark_w=SPARK_W, spark_h=SPARK_H)

    @router.get("/sandboxes")
    async def page(request: Request, viewer: Viewer = Depends(signed_in), state: str = "", template: str = "",
                   metadata: str = "", page: int = 1) -> Response:
        context = await table_context(viewer, Filters(state if state in STATES else "", template, metadata, page))
        return dash.render(request, "sandboxes.html", viewer, title="Sandboxes", **context)

    @router.get("/sandboxes/table")
    async def table(request: Request, viewer: Viewer = Depends(signed_in), state: str = "", template: str = "",
                    metadata: str = "", page: int = 1) -> Response:
        context = await table_context(viewer, Filters(state if state in STATES else "", template, metadata, page))
        return dash.render(request, "_sandbox_table.html", viewer, **context)

    async def act(request: Request, viewer: Viewer, work) -> Response:
        """Runs the action; answers the flash message (htmx) or goes back to the page (a plain form post)."""
        try:
            message, status, kind = await work(), 200, "ok"
        except Exception as e:
            status, message = to_http(e, dash.paths)
            kind = "error"
        if request.headers.get("hx-request") != "true":
            return RedirectResponse(f"{request.scope.get('root_path', '')}/sandboxes?flash={quote(message)}",
                                    status_code=303)
        return dash.render(request, "_flash.html", viewer, status=status, kind=kind, message=message,
                           headers={"hx-trigger": "sandboxes-changed"} if kind == "ok" else None)

    @router.post("/sandboxes/{sandbox_id}/kill")
    async def kill(request: Request, sandbox_id: str, viewer: Viewer = Depends(changing(SANDBOXES))) -> Response:
        async def work() -> str:
            await plane.sandboxes.kill(viewer.key.owner, sandbox_id)
            return f"Killed {sandbox_id}."
        return await act(request, viewer, work)

    @router.post("/sandboxes/{sandbox_id}/pause")
    async def pause(request: Request, sandbox_id: str, viewer: Viewer = Depends(changing(SANDBOXES))) -> Response:
        async def work() -> str:
            await plane.branching.pause(viewer.key.owner, sandbox_id, memory=True)
            return f"Paused {sandbox_id} (with its memory)."
        return await act(request, viewer, work)

    @router.post("/sandboxes/{sandbox_id}/resume")
    async def resume(request: Request, sandbox_id: str, viewer: Viewer = Depends(changing(SANDBOXES))) -> Response:
        async def work() -> str:
            _, resumed = await plane.branching.resume(viewer.key.owner, sandbox_id, timeout=None, memory=True)
            return f"Resumed {sandbox_id}." if resumed else f"{sandbox_id} was already running."
        return await act(request, viewer, work)

    @router.post("/sandboxes/{sandbox_id}/extend")
    async def extend(request: Request, sandbox_id: str, viewer: Viewer = Depends(changing(SANDBOXES)),
                     seconds: int = Form(EXTEND_S, ge=1, le=86400)) -> Response:
        async def work() -> str:
            row: SandboxRow = await plane.sandboxes.get(viewer.key.owner, sandbox_id)
            timeout = max(0, round(row.end_at - time.time())) + seconds
            check_timeout(viewer.key.limits, timeout)
            await plane.sandboxes.set_timeout(viewer.key.owner, sandbox_id, timeout)
            return f"{sandbox_id} now ends in {timeout // 60} min."
        return await act(request, viewer, work)

    @router.post("/sandboxes/{sandbox_id}/fork")
    async def fork(request: Request, sandbox_id: str, viewer: Viewer = Depends(changing(SANDBOXES))) -> Response:
        async def work() -> str:
            results = await plane.branching.fork(viewer.key.owner, sandbox_id, count=1, timeout=None)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            return f"Forked {sandbox_id} into {', '.join(r.id for r in results)}."
        return await act(request, viewer, work)

    @router.post("/sandboxes/{sandbox_id}/snapshot")
    async def snapshot(request: Request, sandbox_id: str,
                       viewer: Viewer = Depends(changing(SANDBOXES))) -> Response:
        name = (request.headers.get("hx-prompt") or "").strip() or None

        async def work() -> str:
            node = await plane.branching.snapshot(viewer.key.owner, sandbox_id, name=name, memory=True)
            return f"Snapshot {node.id} of {sandbox_id} taken" + (f" as {name!r}." if name else ".")
        return await act(request, viewer, work)

    return router
