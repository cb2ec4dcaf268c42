"""One sandbox's page: its header (state, template, age, time left, resources, metadata, the table's actions),
CPU/memory/disk charts over its life from the samples the server keeps, its logs following live, a file
browser, a terminal (xterm.js over a WebSocket bridged to a PTY through envd), the live desktop of a desktop
sandbox (noVNC over a WebSocket bridged to the sandbox's VNC server), and its place in the checkpoint tree.

Reads go through the control plane with the viewer's owner (another team's sandbox is 404, as in the API).
Files, terminal and desktop reach the sandbox's envd directly (dashboard/envd_client.py) and need the
`execute` scope, as the envd token does in the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import secrets
import shlex
import time
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.control import sandbox_logs
from corral.control.db import SandboxRow
from corral.control.errors import ApiError
from corral.control.keys import ApiKey
from corral.control.scopes import EXECUTE, SANDBOXES
from corral.dashboard.envd_client import EnvdError, SandboxEnvd
from corral.dashboard.sessions import COOKIE
from corral.dashboard.web import Dashboard, Refused, Viewer, changing, signed_in

log = logging.getLogger("corral.dashboard")

HOME = "/home/user"  # where the file browser opens (envd's default user's home; "/" when it is missing)
MAX_LOG_LINES = 2000  # shown at once on the page
TERMINAL_SIZE = (120, 32)
DESKTOP_TEMPLATES = ("desktop",)
DESKTOP_VNC_PORT = 5917  # the dashboard's own x11vnc: not the SDK stream's 5900, whose password it does not know
DESKTOP_DISPLAY = ":0"
# How long the dashboard's x11vnc outlives its last viewer (a reload or a second tab reuses it meanwhile).
DESKTOP_VNC_LINGER_S = float(os.environ.get("CORRAL_DASHBOARD_VNC_LINGER_S", "30"))
# The port in a shell variable, so that `pkill -f`/`pgrep -f` for it do not find the shell running them.
PORT_VARIABLE = f"port={DESKTOP_VNC_PORT // 100}; port=${{port}}{DESKTOP_VNC_PORT % 100:02d};"
# Closing codes of the terminal and desktop WebSockets (4000-4999 are the application's): the browser shows
# the reason.
WS_UNAUTHORIZED, WS_FORBIDDEN, WS_NOT_FOUND, WS_UNAVAILABLE = 4401, 4403, 4404, 4409


async def websocket_viewer(dash: Dashboard, websocket: WebSocket, scope: str) -> ApiKey:
    """The key of the session a WebSocket carries (its cookie; browsers send it on same-origin sockets), or
    Refused: no session or a revoked key (401), another site's page (Origin is not this Host: a WebSocket has
    no CORS, so this is its CSRF check) or a key without `scope` (403)."""
    origin = websocket.headers.get("origin")
    host = websocket.headers.get("host", "")
    if origin is None or origin.split("://", 1)[-1] != host:
        raise Refused(403, "This WebSocket comes from another site: refused.")
    session = dash.sessions.get(websocket.cookies.get(COOKIE))
    if session is None:
        raise Refused(401, "Sign in to the dashboard first.")
    key = await dash.keys.active(session.key_id)
    if key is None:
        raise Refused(401, "The API key of this session was revoked or has expired.")
    if not key.allows(scope):
        raise Refused(403, f"This API key lacks the '{scope}' scope.")
    return key


def chart_data(samples) -> dict:
    """The metric rows as the page's charts draw them: times and values per series."""
    return {
        "x": [s.ts for s in samples],
        "cpu": [round(s.cpu_used_pct, 1) for s in samples],
        "cpus": samples[-1].cpu_count if samples else None,
        "mem": [round(s.mem_used / 2**20, 1) for s in samples],
        "memTotal": [round(s.mem_total / 2**20, 1) for s in samples],
        "disk": [round(s.disk_used / 2**20, 1) for s in samples],
        "diskTotal": [round(s.disk_total / 2**20, 1) for s in samples],
    }


def filesize(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def parent_of(path: str) -> str | None:
    return None if path in ("", "/") else posixpath.dirname(path.rstrip("/")) or "/"


def crumbs(path: str) -> list[tuple[str, str]]:
    """(name, path) of each directory from / down to `path`, for the breadcrumb."""
    parts = [p for p in path.split("/") if p]
    return [("/", "/")] + [(p, "/" + "/".join(parts[:i + 1])) for i, p in enumerate(parts)]


def sandbox_detail_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()
    plane = dash.plane
    dash.templates.filters.setdefault("filesize", filesize)

    async def row_of(viewer_key: ApiKey, sandbox_id: str) -> SandboxRow:
        try:
            return await plane.sandboxes.get(viewer_key.owner, sandbox_id)
        except ApiError as e:
            raise Refused(e.status, e.message) from None

    @contextlib.asynccontextmanager
    async def envd_of(key: ApiKey, sandbox_id: str):
        """The running sandbox's envd, for a key with `execute` whose team owns it; kept awake meanwhile."""
        row = await row_of(key, sandbox_id)
        if not key.allows(EXECUTE):
            raise Refused(403, f"This API key lacks the '{EXECUTE}' scope that files, the terminal and the "
                               "desktop need.")
        address = await plane.orchestrator.reachable_address(sandbox_id) if row.state == "running" else None
        if address is None:
            raise Refused(409, f"{sandbox_id} is {row.state}: resume it to reach its files, terminal and desktop.")
        with plane.orchestrator.in_use(sandbox_id):
            async with SandboxEnvd(address, row.envd_token) as envd:
                yield envd

    async def context(viewer: Viewer, row: SandboxRow) -> dict:
        now = time.time()
        nodes = await plane.tree.list_nodes(viewer.key.owner, sandbox_id=row.id)
        return dict(s=row, now=now, can_act=viewer.can(SANDBOXES), can_execute=viewer.can(EXECUTE),
                    at_node=row.paused_node if row.state == "paused" else row.head, nodes=nodes,
                    desktop=row.template.partition(":")[0] in DESKTOP_TEMPLATES)

    @router.get("/sandboxes/{sandbox_id}")
    async def page(request: Request, sandbox_id: str, viewer: Viewer = Depends(signed_in)) -> Response:
        row = await row_of(viewer.key, sandbox_id)
        samples = await plane.sandboxes.metrics(viewer.key.owner, sandbox_id, None, None)
        return dash.render(request, "sandbox.html", viewer, title=sandbox_id, charts=chart_data(samples),
                           home=HOME, interval=plane.settings.metrics_interval_s, **await context(viewer, row))

    @router.get("/sandboxes/{sandbox_id}/head")
    async def head(request: Request, sandbox_id: str, viewer: Viewer = Depends(signed_in)) -> Response:
        try:
            row = await plane.sandboxes.get(viewer.key.owner, sandbox_id)
        except ApiError:
            return dash.render(request, "_sandbox_gone.html", viewer, sandbox_id=sandbox_id)
        return dash.render(request, "_sandbox_head.html", viewer, **await context(viewer, row))

    @router.get("/sandboxes/{sandbox_id}/metrics.json")
    async def metrics(sandbox_id: str, viewer: Viewer = Depends(signed_in), since: float | None = None
                      ) -> JSONResponse:
        try:
            samples = await plane.sandboxes.metrics(viewer.key.owner, sandbox_id, since, None)
        except ApiError as e:
            raise Refused(e.status, e.message) from None
        return JSONResponse(chart_data(samples))

    @router.get("/sandboxes/{sandbox_id}/logs")
    async def logs(request: Request, sandbox_id: str, viewer: Viewer = Depends(signed_in), runtime: int = 0,
                   start: int = 0) -> Response:
        """The lines not shown yet: `runtime` and `start` count what the page has of each source. A source that
        now has fewer lines started anew (a resume): the page then gets it all again."""
        row = await row_of(viewer.key, sandbox_id)
        lines: list[sandbox_logs.LogLine] = []
        if row.state == "running":
            async with plane.sandboxes.locks[sandbox_id]:
                lines = await sandbox_logs.read_sandbox_logs(plane.orchestrator, sandbox_id, dash.paths)
        by_source = {"runtime": [ln for ln in lines if ln.source == "runtime"],
                     "start": [ln for ln in lines if ln.source == "start"]}
        restart = len(by_source["runtime"]) < runtime or len(by_source["start"]) < start
        shown = {"runtime": 0 if restart else runtime, "start": 0 if restart else start}
        new = [ln for source, found in by_source.items() for ln in found[shown[source]:]][-MAX_LOG_LINES:]
        return dash.render(request, "_sandbox_logs.html", viewer, s=row, new=new, restart=restart,
                           counts={k: len(v) for k, v in by_source.items()}, first=not (runtime or start))

    # --- files ---------------------------------------------------------------------------------------

    async def listing(request: Request, viewer: Viewer, sandbox_id: str, path: str, **extra) -> Response:
        path = posixpath.normpath("/" + path.lstrip("/")) if path else HOME
        problem, entries = None, []
        try:
            async with envd_of(viewer.key, sandbox_id) as envd:
                try:
                    entries = await envd.list_dir(path)
                except EnvdError as e:
                    if path == HOME and not extra:
                        path, entries = "/", await envd.list_dir("/")
                    else:
                        problem = str(e)
        except Refused as e:
            problem = e.message
        except EnvdError as e:
            problem = str(e)
        return dash.render(request, "_sandbox_files.html", viewer, sandbox_id=sandbox_id, path=path,
                           entries=entries, problem=problem, parent=parent_of(path), crumbs=crumbs(path), **extra)

    @router.get("/sandboxes/{sandbox_id}/files")
    async def files(request: Request, sandbox_id: str, viewer: Viewer = Depends(signed_in), path: str = "") -> Response:
        await row_of(viewer.key, sandbox_id)
        if not viewer.can(EXECUTE):
            raise Refused(403, f"This API key lacks the '{EXECUTE}' scope the file browser needs.")
        return await listing(request, viewer, sandbox_id, path)

    @router.get("/sandboxes/{sandbox_id}/files/download")
    async def download(sandbox_id: str, path: str, viewer: Viewer = Depends(signed_in)) -> Response:
        stack = contextlib.AsyncExitStack()
        try:
            envd = await stack.enter_async_context(envd_of(viewer.key, sandbox_id))
            answer = await stack.enter_async_context(envd.download(path))
        except EnvdError as e:
            await stack.aclose()
            raise Refused(404, str(e)) from None
        except BaseException:
            await stack.aclose()
            raise

        async def body():
            try:
                async for chunk in answer.aiter_bytes(1 << 16):
                    yield chunk
            finally:
                await stack.aclose()
        name = posixpath.basename(path) or "download"
        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"content-disposition": f"attachment; filename*=UTF-8''{quote(name)}"})

    @router.post("/sandboxes/{sandbox_id}/files/upload")
    async def upload(request: Request, sandbox_id: str, viewer: Viewer = Depends(changing(EXECUTE)),
                     directory: str = Form(...), file: UploadFile = File(...)) -> Response:
        name = posixpath.basename(file.filename or "")
        if not name or name in (".", ".."):
            raise Refused(400, "Choose a file to upload.")
        directory = posixpath.normpath("/" + directory.lstrip("/"))
        target = posixpath.join(directory, name)
        try:
            async with envd_of(viewer.key, sandbox_id) as envd:
                await envd.upload(target, name, await file.read())
        except EnvdError as e:
            status, message = 400, f"Uploading {name} failed: {e}"
        else:
            status, message = 200, f"Uploaded {target}."
        return await listing(request, viewer, sandbox_id, directory, notice=message,
                             notice_kind="ok" if status == 200 else "error")

    # --- terminal --------------------------------------------------------------------------------------

    async def refuse(websocket: WebSocket, e: Refused) -> None:
        code = {401: WS_UNAUTHORIZED, 403: WS_FORBIDDEN, 404: WS_NOT_FOUND}.get(e.status, WS_UNAVAILABLE)
        await websocket.close(code=code, reason=e.message[:120])

    @router.websocket("/sandboxes/{sandbox_id}/terminal")
    async def terminal(websocket: WebSocket, sandbox_id: str, cols: int = TERMINAL_SIZE[0],
                       rows: int = TERMINAL_SIZE[1]) -> None:
        """Browser -> here: text frames of JSON, {"input": "..."} or {"resize": [cols, rows]}; here -> browser:
        binary frames of what the PTY prints, then a close with the shell's exit code in the reason."""
        try:
            key = await websocket_viewer(dash, websocket, EXECUTE)
            async with envd_of(key, sandbox_id) as envd:
                await websocket.accept()
                pty = envd.pty(max(2, min(cols, 500)), max(2, min(rows, 200)))
                await bridge_pty(websocket, pty)
        except Refused as e:
            await refuse(websocket, e)

    async def bridge_pty(websocket: WebSocket, pty) -> None:
        async def to_browser() -> None:
            async for data in pty.output():
                await websocket.send_bytes(data)

        async def from_browser() -> None:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    continue
                try:
                    command = json.loads(text)
                except ValueError:
                    continue
                if "input" in command and isinstance(command["input"], str):
                    await pty.write(command["input"].encode())
                elif "resize" in command:
                    cols_rows = command["resize"]
                    if isinstance(cols_rows, list) and len(cols_rows) == 2:
                        await pty.resize(max(2, min(int(cols_rows[0]), 500)), max(2, min(int(cols_rows[1]), 200)))

        output = asyncio.ensure_future(to_browser())
        browser = asyncio.ensure_future(from_browser())
        try:
            done, _ = await asyncio.wait({output, browser}, return_when=asyncio.FIRST_COMPLETED)
            failed = next((t.exception() for t in done if t.exception() is not None), None)
            if output in done:
                reason = (f"the terminal failed: {failed}" if failed else f"exited with code {pty.exit_code}")
                with contextlib.suppress(Exception):
                    await websocket.close(code=1000, reason=reason[:120])
        finally:
            for task in (output, browser):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(output, browser, return_exceptions=True)
            await pty.kill()

    # --- desktop ---------------------------------------------------------------------------------------

    desktop_passwords: dict[str, str] = {}  # sandbox id -> the VNC password of the dashboard's x11vnc in it
    desktop_viewers: dict[str, int] = {}  # sandbox id -> WebSockets bridged to that x11vnc now
    desktop_last_used: dict[str, tuple[float, ApiKey]] = {}  # sandbox id -> when and by whom it was last used

    def desktop_used(sandbox_id: str, key: ApiKey) -> None:
        """Notes a start or a viewer leaving; the x11vnc stops DESKTOP_VNC_LINGER_S later unless used again."""
        desktop_last_used[sandbox_id] = (time.monotonic(), key)
        # Every use schedules a check; the check itself decides (a later use makes the earlier ones no-ops).
        asyncio.get_running_loop().call_later(DESKTOP_VNC_LINGER_S, check_idle_vnc, sandbox_id)

    stopping: set[asyncio.Task] = set()  # referenced until done (the loop keeps only weak references)

    def check_idle_vnc(sandbox_id: str) -> None:
        task = asyncio.ensure_future(stop_idle_vnc(sandbox_id))
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    async def stop_idle_vnc(sandbox_id: str) -> None:
        async with desktop_lock(sandbox_id):  # not while a start of the same sandbox runs
            used = desktop_last_used.get(sandbox_id)
            if used is None or desktop_viewers.get(sandbox_id, 0) > 0:
                return
            if time.monotonic() - used[0] < DESKTOP_VNC_LINGER_S - 0.05:
                return  # used since: a later check decides
            del desktop_last_used[sandbox_id]
            desktop_passwords.pop(sandbox_id, None)
            try:
                async with envd_of(used[1], sandbox_id) as envd:
                    await envd.run(["/bin/sh", "-c", f"{PORT_VARIABLE} pkill -f \"rfbport $port\"; rm -f "
                                                     "$HOME/.corral-dashboard-vnc"], timeout=10)
            except (Refused, EnvdError, ApiError, OSError) as e:  # killed, paused or its key revoked meanwhile
                log.info("the dashboard's VNC server in %s was not stopped: %s", sandbox_id, e)

    desktop_locks: dict[str, asyncio.Lock] = {}  # one per desktop viewed (kept: a lock is a few bytes)

    def desktop_lock(sandbox_id: str) -> asyncio.Lock:
        return desktop_locks.setdefault(sandbox_id, asyncio.Lock())

    def vnc_command(password: str) -> list[str]:
        """Starts (again) an x11vnc of the dashboard's on the desktop's display: on its own port, with a VNC
        password the page gets (not on the command line: in a file only the sandbox's user reads), shared and
        kept across viewers. A running one is replaced: its password may be one a restarted server forgot."""
        auth = "$HOME/.corral-dashboard-vnc"
        script = (f"{PORT_VARIABLE} pkill -f \"rfbport $port\"; sleep 0.2; umask 077; "
                  f"x11vnc -storepasswd {shlex.quote(password)} {auth} >/dev/null 2>&1 && "
                  f"x11vnc -display {DESKTOP_DISPLAY} -rfbport $port -rfbauth {auth} -shared -forever "
                  f"-bg -quiet -o /tmp/.corral-dashboard-vnc.log -noxdamage")
        return ["/bin/sh", "-c", script]

    @router.post("/sandboxes/{sandbox_id}/desktop/start")
    async def desktop_start(sandbox_id: str, viewer: Viewer = Depends(changing(EXECUTE))) -> JSONResponse:
        """Makes sure the dashboard's VNC server runs in the desktop sandbox; its password for the page."""
        async with desktop_lock(sandbox_id), envd_of(viewer.key, sandbox_id) as envd:
            password = desktop_passwords.get(sandbox_id)
            listening = False
            if password is not None:
                code, _ = await envd.run(["/bin/sh", "-c", f"{PORT_VARIABLE} pgrep -f \"rfbport $port\""])
                listening = code == 0
            if not listening:
                password = secrets.token_urlsafe(6)[:8]  # VNC uses the first 8 characters
                try:
                    code, output = await envd.run(vnc_command(password), timeout=30)
                except EnvdError as e:
                    raise Refused(409, f"The desktop's VNC server did not start: {e}") from None
                if code != 0:
                    raise Refused(409, "The desktop's VNC server did not start (is this a desktop sandbox?): "
                                       + output.decode(errors="replace")[-200:])
                desktop_passwords[sandbox_id] = password
        desktop_used(sandbox_id, viewer.key)  # stopped again if no viewer comes
        return JSONResponse({"password": password})

    @router.websocket("/sandboxes/{sandbox_id}/desktop")
    async def desktop(websocket: WebSocket, sandbox_id: str) -> None:
        """noVNC's RFB protocol, carried in binary WebSocket frames to the x11vnc `desktop/start` started."""
        try:
            key = await websocket_viewer(dash, websocket, EXECUTE)
            async with envd_of(key, sandbox_id):
                address = await plane.orchestrator.reachable_address(sandbox_id)
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, DESKTOP_VNC_PORT), 10)
                except (OSError, TimeoutError):
                    raise Refused(409, "The desktop's VNC server does not answer: start the view again.") from None
                subprotocol = "binary" if "binary" in websocket.scope.get("subprotocols", []) else None
                await websocket.accept(subprotocol=subprotocol)
                desktop_viewers[sandbox_id] = desktop_viewers.get(sandbox_id, 0) + 1
                try:
                    await bridge_tcp(websocket, reader, writer)
                finally:
                    desktop_viewers[sandbox_id] -= 1
                    if not desktop_viewers[sandbox_id]:
                        del desktop_viewers[sandbox_id]
                        desktop_used(sandbox_id, key)
        except Refused as e:
            await refuse(websocket, e)

    async def bridge_tcp(websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def to_browser() -> None:
            while data := await reader.read(1 << 16):
                await websocket.send_bytes(data)

        async def from_browser() -> None:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data:
                    writer.write(data)
                    await writer.drain()

        tasks = [asyncio.ensure_future(to_browser()), asyncio.ensure_future(from_browser())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            with contextlib.suppress(Exception):
                await websocket.close(code=1000, reason="the desktop's VNC connection ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()

    return router
