"""What every dashboard page shares: who is signed in (`signed_in`), the guard on every change (`changing`:
session, CSRF token, scope), the navigation, and rendering a template with the common context.

A page module exposes `xxx_pages(dash: Dashboard) -> APIRouter`; app.py includes it. Its GET routes take
`viewer: Viewer = Depends(signed_in)` and show only what `viewer.key.team_id` owns; its POST routes take
`Depends(changing(<scope>))`, which refuses (403) a request without the session's CSRF token or whose key
lacks the scope, before the route runs. Reads go straight to the control plane's own functions with
`viewer.key.owner`, as the REST API's routes do: the team filter lives there, once."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from corral.control.errors import HostPaths
from corral.control.keys import ApiKey, ApiKeys
from corral.control.plane import ControlPlane
from corral.dashboard import assets
from corral.dashboard.sessions import COOKIE, CSRF_FIELD, CSRF_HEADER, Session, Sessions, same_token

HERE = Path(__file__).parent
log = logging.getLogger("corral.dashboard")


class Refused(Exception):
    """A dashboard request that may not go on: 401 (not signed in, or the key is gone) or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class NavItem:
    path: str  # under the dashboard's root, e.g. "/sandboxes"
    label: str
    coming: bool = False  # a placeholder page that says what is coming


# The navigation, in order. A new page adds its entry here (and drops `coming` once it is built).
NAV = [
    NavItem("/sandboxes", "Sandboxes"),
    NavItem("/templates", "Templates"),
    NavItem("/tree", "Tree"),
    NavItem("/usage", "Usage"),
    NavItem("/events", "Events"),
    NavItem("/keys", "Keys"),
]


@dataclass(frozen=True)
class Viewer:
    """The signed-in key (fresh from the database on this request) and its session."""

    key: ApiKey
    session: Session

    def can(self, scope: str) -> bool:
        return self.key.allows(scope)

    @property
    def csrf(self) -> str:
        return self.session.csrf


class Dashboard:
    """The dashboard's state, handed to every page module: the control plane, the keys, the sessions and the
    templates."""

    def __init__(self, plane: ControlPlane, keys: ApiKeys, paths: HostPaths | None = None) -> None:
        self.plane, self.keys, self.paths = plane, keys, paths
        self.sessions = Sessions()
        self.team_names: dict[str, str] = {}  # shown in the header; filled at sign-in (teams are not renamed)
        self.missing_assets = assets.missing()
        if self.missing_assets:
            log.warning("the dashboard's front-end packages %s are missing from %s: its pages work without "
                        "live updates and charts until `python -m corral.dashboard.assets fetch` (scripts/"
                        "install.sh runs it) fetches them", ", ".join(self.missing_assets), assets.VENDOR)
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                            autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self.templates.filters.update(duration=duration, clock=clock, day=day, megabytes=megabytes, money=money,
                                      amount=amount)

    def render(self, request: Request, template: str, viewer: Viewer | None = None, *, status: int = 200,
               headers: dict[str, str] | None = None, **context) -> HTMLResponse:
        base = request.scope.get("root_path", "")
        page = self.templates.get_template(template).render(
            request=request, base=base, viewer=viewer, nav=NAV,
            team_name=self.team_names.get(viewer.key.team_id) if viewer else None, missing_assets=self.missing_assets,
            current=request.url.path.removeprefix(base) or "/", csrf_field=CSRF_FIELD, **context)
        return HTMLResponse(page, status_code=status, headers=headers)


def dashboard_of(request: Request) -> Dashboard:
    return request.app.state.dashboard


async def signed_in(request: Request) -> Viewer:
    dash = dashboard_of(request)
    token = request.cookies.get(COOKIE)
    session = dash.sessions.get(token)
    if session is None:
        raise Refused(401, "Sign in with an API key to see the dashboard.")
    key = await dash.keys.active(session.key_id)
    if key is None:  # revoked or expired since sign-in: the session ends with it
        dash.sessions.close(token)
        raise Refused(401, "The API key of this session was revoked or has expired. Sign in again.")
    return Viewer(key, session)


def _same_origin(request: Request) -> bool:
    """A browser names the site a POST comes from: one from another site is refused even with a token
    (clients that send no Origin still need the token)."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def changing(scope: str) -> Callable:
    """The guard of a POST route: signed in, the session's CSRF token (header or form field), same origin,
    and the key holds `scope`. Returns the viewer."""
    async def guard(request: Request) -> Viewer:
        viewer = await signed_in(request)
        presented = request.headers.get(CSRF_HEADER)
        if presented is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            presented = (await request.form()).get(CSRF_FIELD)
        if not same_token(presented if isinstance(presented, str) else None, viewer.csrf):
            raise Refused(403, "This request lacks the page's CSRF token: reload the page and try again.")
        if not _same_origin(request):
            raise Refused(403, "This request comes from another site: refused.")
        if not viewer.can(scope):
            raise Refused(403, f"This API key lacks the '{scope}' scope this action needs "
                               f"({', '.join(sorted(viewer.key.scopes))} held).")
        return viewer

    return guard


def signin_url(request: Request) -> str:
    base = request.scope.get("root_path", "")
    return f"{base}/signin?next={quote(request.url.path)}"


# --- formatting, as filters in the templates ---------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A span as a person reads it: 45s, 12m, 3h 5m, 2d 4h."""
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def clock(ts: float | None) -> str:
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def day(ts: float | None) -> str:
    return "—" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def megabytes(value: float | None) -> str:
    if value is None:
        return "—"
    mb = value / (1 << 20)
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def amount(value: float) -> str:
    """A quantity with two decimals, or two significant digits when it is smaller than that shows."""
    return f"{value:,.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def money(value: float | None, currency: str = "USD") -> str:
    if value is None:
        return "—"
    return f"{value:,.4f} {currency}" if 0 < abs(value) < 1 else f"{value:,.2f} {currency}"
