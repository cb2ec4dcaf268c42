"""The dashboard as an ASGI application, mounted at /dashboard by the API (control/api.py), so `corral serve`
serves it on the same listener. Its routes are outside the API's OpenAPI schema and its key-per-request
scope table: they authenticate with the session cookie (web.py) and check scopes themselves."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from corral.control.errors import HostPaths
from corral.control.keys import ApiKeys
from corral.control.plane import ControlPlane
from corral.dashboard import assets
from corral.dashboard.pages.auth import auth_pages
from corral.dashboard.pages.coming import coming_pages
from corral.dashboard.pages.events import event_pages
from corral.dashboard.pages.keys import key_pages
from corral.dashboard.pages.sandbox import sandbox_detail_pages
from corral.dashboard.pages.sandboxes import sandbox_pages
from corral.dashboard.pages.templates import template_pages
from corral.dashboard.pages.tree import tree_pages
from corral.dashboard.pages.usage import usage_pages
from corral.dashboard.web import HERE, Dashboard, Refused, signin_url

# Scripts only from the dashboard itself (no inline script, no eval: htmx runs with allowEval off); inline
# styles are allowed for what the chart library sets on its own elements.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def create_dashboard(plane: ControlPlane, keys: ApiKeys, paths: HostPaths | None = None) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    dash = app.state.dashboard = Dashboard(plane, keys, paths)

    @app.middleware("http")
    async def security_headers(request: Request, call_next) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith((f"{request.scope.get('root_path', '')}/static",
                                            f"{request.scope.get('root_path', '')}/vendor")):
            response.headers.setdefault("cache-control", "no-store")
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        htmx = request.headers.get("hx-request") == "true"
        if exc.status == 401:
            if htmx:  # htmx follows HX-Redirect with a full page load
                return Response(status_code=401, headers={"hx-redirect": signin_url(request)})
            if request.method == "GET":
                return RedirectResponse(signin_url(request), status_code=303)
            return HTMLResponse(exc.message, status_code=401)
        if htmx:
            return dash.render(request, "_flash.html", status=exc.status, kind="error", message=exc.message)
        return dash.render(request, "error.html", status=exc.status, message=exc.message,
                           title="Not found" if exc.status == 404 else "Not allowed")

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.mount("/vendor", StaticFiles(directory=assets.VENDOR, check_dir=False), name="vendor")
    for pages in (auth_pages, sandbox_pages, sandbox_detail_pages, tree_pages, template_pages, usage_pages, event_pages,
                  key_pages, coming_pages):
        app.include_router(pages(dash))
    return app
