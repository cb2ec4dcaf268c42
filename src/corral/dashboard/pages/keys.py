"""The keys page: the team's API keys (names, prefixes, scopes, limits, expiry; never a secret), and for keys
with the `admin` scope: create a key in the same team (its secret shown once) and revoke one. A key cannot
act on another team's keys: both actions look the key up within the viewer's team first."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.control import scopes as scope_names
from corral.control.keys import KeyLimits
from corral.control.scopes import ADMIN
from corral.dashboard.web import Dashboard, Refused, Viewer, changing, signed_in


def _number(form, name: str, kind=int):
    raw = str(form.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name.replace('_', ' ')} must be a number, not {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name.replace('_', ' ')} must be above 0 (or left empty for no limit)")
    return value


def key_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()

    async def render(request: Request, viewer: Viewer, *, status: int = 200, **extra) -> Response:
        keys = await dash.keys.list(viewer.key.team_id)
        now = time.time()
        return dash.render(request, "keys.html", viewer, status=status, title="Keys", keys=keys, now=now,
                           scope_names=scope_names.ALL, scope_help=scope_names.DESCRIPTIONS,
                           default_scopes=scope_names.DEFAULT, can_admin=viewer.can(ADMIN), **extra)

    @router.get("/keys")
    async def page(request: Request, viewer: Viewer = Depends(signed_in)) -> Response:
        return await render(request, viewer)

    @router.post("/keys")
    async def create(request: Request, viewer: Viewer = Depends(changing(ADMIN))) -> Response:
        form = await request.form()
        name = str(form.get("name") or "").strip()[:64]
        try:
            if not name:
                raise ValueError("a key needs a name")
            templates = str(form.get("templates") or "").replace(",", " ").split()
            limits = KeyLimits(templates=tuple(templates) or None, max_timeout_s=_number(form, "max_timeout_s"),
                               max_vcpus=_number(form, "max_vcpus", float),
                               max_memory_mb=_number(form, "max_memory_mb"),
                               max_concurrent=_number(form, "max_concurrent"))
            expires_days = _number(form, "expires_days", float)
            created, secret = await dash.keys.create(
                name, team=viewer.key.team_id, scopes=[str(s) for s in form.getlist("scopes")],
                expires_at=time.time() + expires_days * 86400 if expires_days else None, limits=limits)
        except ValueError as e:  # UnknownScope is one too
            return await render(request, viewer, status=400, problem=str(e).capitalize(), form=form)
        return await render(request, viewer, created=created, secret=secret)

    @router.post("/keys/{key_id}/revoke")
    async def revoke(request: Request, key_id: str, viewer: Viewer = Depends(changing(ADMIN))) -> Response:
        if key_id not in {k.id for k in await dash.keys.list(viewer.key.team_id)}:
            raise Refused(404, f"Your team has no key {key_id}.")
        revoked = await dash.keys.revoke(key_id)
        dash.sessions.close_key(key_id)
        return await render(request, viewer, revoked=revoked)

    return router
