"""Sign-in with an API key, sign-out, and the dashboard's root."""

from __future__ import annotations

import contextlib
import secrets

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from corral.control.scopes import READ
from corral.dashboard.sessions import COOKIE, CSRF_FIELD, LIFETIME_S, SIGNIN_COOKIE, same_token
from corral.dashboard.web import Dashboard, Viewer, changing


def _next_page(base: str, wanted: str | None) -> str:
    """Where to go after sign-in: a dashboard page only (never another site: `//evil` or a full URL)."""
    if wanted and wanted.startswith(f"{base}/") and not wanted.startswith("//") and "\\" not in wanted:
        return wanted
    return f"{base}/sandboxes"


def _cookie_path(request: Request) -> str:
    return request.scope.get("root_path", "") or "/"


def auth_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()

    @router.get("/")
    async def root(request: Request) -> Response:
        return RedirectResponse(f"{request.scope.get('root_path', '')}/sandboxes", status_code=303)

    def signin_page(request: Request, *, next_page: str | None, error: str | None = None,
                    status: int = 200) -> Response:
        token = secrets.token_urlsafe(24)
        response = dash.render(request, "signin.html", status=status, signin_token=token, next_page=next_page,
                               error=error)
        response.set_cookie(SIGNIN_COOKIE, token, httponly=True, samesite="strict", path=_cookie_path(request),
                            secure=request.url.scheme == "https")
        return response

    @router.get("/signin")
    async def signin_form(request: Request, next: str | None = None) -> Response:
        return signin_page(request, next_page=next)

    @router.post("/signin")
    async def signin(request: Request, key: str = Form(""), next: str | None = Form(None)) -> Response:
        form = await request.form()
        if not same_token(form.get(CSRF_FIELD), request.cookies.get(SIGNIN_COOKIE, "")):
            return signin_page(request, next_page=next, status=403,
                               error="The sign-in form expired (or cookies are off): please try again.")
        found = await dash.keys.verify(key.strip())
        if found is None:
            return signin_page(request, next_page=next, status=401,
                               error="That is not a valid API key of this server (or it was revoked or has "
                                     "expired). Keys look like e2b_ followed by 40 hex digits.")
        token, _ = dash.sessions.open(found.id)
        with contextlib.suppress(LookupError):
            dash.team_names[found.team_id] = (await dash.keys.team(found.team_id)).name
        base = request.scope.get("root_path", "")
        response = RedirectResponse(_next_page(base, next), status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=_cookie_path(request),
                            secure=request.url.scheme == "https", max_age=int(LIFETIME_S))
        response.delete_cookie(SIGNIN_COOKIE, path=_cookie_path(request))
        return response

    @router.post("/signout")
    async def signout(request: Request, viewer: Viewer = Depends(changing(READ))) -> Response:
        dash.sessions.close(request.cookies.get(COOKIE))
        response = RedirectResponse(f"{request.scope.get('root_path', '')}/signin", status_code=303)
        response.delete_cookie(COOKIE, path=_cookie_path(request))
        if request.headers.get("hx-request") == "true":
            response.headers["hx-redirect"] = f"{request.scope.get('root_path', '')}/signin"
        return response

    return router
