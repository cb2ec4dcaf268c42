"""Corral's web dashboard, served by `corral serve` at /dashboard (docs/dashboard.md): server-rendered pages
(Jinja2) made live with htmx, signed in with an API key into a session cookie.

    app.py       the ASGI app the API mounts; security headers; how a refusal is answered
    web.py       the session guard (`signed_in`), the change guard (`changing(scope)`: CSRF + scope), the
                 navigation, rendering
    sessions.py  the session table and its cookie
    assets.py    the pinned third-party front-end files, fetched at install time into vendor/
    pages/       one module per page; templates/ and static/ beside them

It reads and acts through the control plane's own functions (never through HTTP to itself), always as the
signed-in key's owner, so a team sees only its own sandboxes, usage, events and keys."""
