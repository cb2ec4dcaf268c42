"""`corral mcp`: an MCP server (the official `mcp` SDK's MCPServer) whose tools are Corral's sandboxes, for
any agent that speaks MCP. It is a client of a Corral server like the SDKs: lifecycle calls go to the REST
API, commands, files and code to the sandbox's envd through the unmodified e2b SDKs. A failure (a command's
non-zero exit aside, which is a result) comes back as a tool error the model can read and act on, never as
a crash of this server."""

from __future__ import annotations

import base64
import json
import shlex
import uuid
from typing import Annotated, Any, Literal

import httpx
from e2b import AsyncSandbox, CommandExitException
from e2b_code_interpreter import AsyncSandbox as CodeSandbox
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resources.templates import ResourceSecurity
from pydantic import Field

INSTRUCTIONS = """Corral sandboxes are isolated Linux computers. Create one (template `base` for commands and
files, `code-interpreter-v1` to run Python/JavaScript/bash code with charts, `desktop` for a desktop), then run
commands or code and read or write files in it by its sandbox_id. Sandboxes end at their timeout unless killed
earlier; pause one to keep it (memory included) without it running, resume it later; fork one to explore
alternatives from the same state."""

LANGUAGES = ("python", "js", "ts", "bash", "r", "java")
MAX_TEXT = 100_000  # characters of output returned at once; the rest is cut with a note
DESKTOP_DISPLAY = ":0"  # where the desktop template's X server is (templates/builtin.py)
XDOTOOL_BUTTONS = {"left": 1, "middle": 2, "right": 3}

SandboxId = Annotated[str, Field(description="the sandbox's id, as create_sandbox or list_sandboxes gave it")]
FilePath = Annotated[str, Field(description="a path in the sandbox; relative paths are under /home/user")]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"\n[... {len(text) - MAX_TEXT} more characters cut]"


class CorralApi:
    """The REST calls the tools make, with the API's own error messages as tool errors."""

    def __init__(self, api_url: str, api_key: str, domain: str | None) -> None:
        self.api_url = api_url.rstrip("/")
        self.domain = domain
        self.opts = {"api_url": self.api_url, "sandbox_url": self.api_url, "api_key": api_key,
                     **({"domain": domain} if domain else {})}
        self._http = httpx.AsyncClient(base_url=self.api_url, headers={"X-API-KEY": api_key}, timeout=300)

    async def call(self, method: str, path: str, **kwargs) -> Any:
        try:
            answer = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ToolError(f"the Corral server at {self.api_url} is unreachable: {e}") from None
        if answer.status_code >= 400:
            try:
                message = answer.json().get("message") or answer.text
            except ValueError:
                message = answer.text
            raise ToolError(f"{method} {path} failed with {answer.status_code}: {message}")
        return answer.json() if answer.content else None

    async def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        try:
            return await AsyncSandbox.connect(sandbox_id, **self.opts)
        except Exception as e:
            raise ToolError(f"cannot reach sandbox {sandbox_id}: {e}") from None


    async def close(self) -> None:
        await self._http.aclose()


class Clients:
    """One CorralApi per API key, so the HTTP endpoint's callers each act with their own key (only keys the
    server verified get here, so there are as many as the server has keys)."""

    def __init__(self, api_url: str, domain: str | None) -> None:
        self.api_url, self.domain = api_url, domain
        self._by_key: dict[str, CorralApi] = {}

    def of(self, api_key: str) -> CorralApi:
        if (api := self._by_key.get(api_key)) is None:
            api = self._by_key[api_key] = CorralApi(self.api_url, api_key, self.domain)
        return api

    async def close(self) -> None:
        for api in self._by_key.values():
            await api.close()
        self._by_key.clear()


def bearer_key(authorization: str | None) -> str | None:
    """The API key in an `Authorization: Bearer <key>` header."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def build_server(api_url: str, api_key: str | None = None, domain: str | None = None) -> MCPServer:
    """The tools, acting with `api_key`; without one (the HTTP endpoint) each request's bearer key."""
    clients = Clients(api_url, domain)

    def api_of(ctx: Context) -> CorralApi:
        if api_key is not None:
            return clients.of(api_key)
        request = ctx.request_context.request
        key = bearer_key(request.headers.get("authorization")) if request is not None else None
        if key is None:  # the endpoint refuses such requests before they get here
            raise ToolError("no API key: send it as `Authorization: Bearer <key>`")
        return clients.of(key)

    server = MCPServer("corral", instructions=INSTRUCTIONS)
    server.clients = clients  # closed by whoever serves it

    @server.tool(description="Create a sandbox from a template; returns its sandbox_id. Templates: base "
                             "(commands, files), code-interpreter-v1 (run_code), desktop, or one of yours.")
    async def create_sandbox(
        ctx: Context,
        template: Annotated[str, Field(description="template name")] = "base",
        timeout_seconds: Annotated[int, Field(ge=1, le=86400, description="it ends after this long")] = 300,
        env: Annotated[dict[str, str] | None, Field(description="environment variables for its commands")] = None,
        metadata: Annotated[dict[str, str] | None, Field(description="labels to find it by")] = None,
    ) -> dict:
        created = await api_of(ctx).call("POST", "/v2/sandboxes", json={
            "templateID": template, "timeout": timeout_seconds, "envVars": env or {}, "metadata": metadata or {}})
        return {"sandbox_id": created["sandboxID"], "template": template, "timeout_seconds": timeout_seconds}

    @server.tool(description="List this key's team's sandboxes (running and paused) with their state.")
    async def list_sandboxes(ctx: Context) -> list[dict]:
        listed = await api_of(ctx).call("GET", "/v2/sandboxes", params={"state": "running,paused"})
        return [{"sandbox_id": s["sandboxID"], "template": s.get("alias") or s["templateID"], "state": s["state"],
                 "started_at": s["startedAt"], "ends_at": s["endAt"], "metadata": s.get("metadata") or {}}
                for s in listed]

    @server.tool(description="Run a shell command (bash) in a sandbox; returns stdout, stderr and exit_code "
                             "(a non-zero exit is a result, not an error). background=true returns at once "
                             "with the process id.")
    async def run_command(
        ctx: Context,
        sandbox_id: SandboxId,
        command: Annotated[str, Field(description="a bash command line")],
        timeout_seconds: Annotated[int, Field(ge=1, le=3600, description="killed after this long")] = 60,
        background: Annotated[bool, Field(description="start it and return at once (servers, long jobs)")] = False,
        cwd: Annotated[str | None, Field(description="working directory (default /home/user)")] = None,
        user: Annotated[str, Field(description="user or root")] = "user",
    ) -> dict:
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        try:
            if background:
                handle = await sandbox.commands.run(command, background=True, cwd=cwd, user=user, timeout=0)
                return {"pid": handle.pid, "background": True}
            result = await sandbox.commands.run(command, timeout=timeout_seconds, cwd=cwd, user=user)
            return {"stdout": _cut(result.stdout), "stderr": _cut(result.stderr), "exit_code": result.exit_code}
        except CommandExitException as e:
            return {"stdout": _cut(e.stdout), "stderr": _cut(e.stderr), "exit_code": e.exit_code}
        except Exception as e:
            raise ToolError(f"running the command failed: {e}") from None

    @server.tool(description="Run code in a code-interpreter sandbox (a Jupyter kernel: state persists between "
                             "calls). Returns printed output, the last expression's value, and charts/images "
                             "as images, a chart's data (type, title, axes, elements) as JSON. A failing cell "
                             "returns its error and traceback as a tool error.",
                 structured_output=False)
    async def run_code(
        ctx: Context,
        sandbox_id: SandboxId,
        code: Annotated[str, Field(description="the code of one cell; its last expression is its result")],
        language: Annotated[str, Field(description=", ".join(LANGUAGES))] = "python",
        timeout_seconds: Annotated[int, Field(ge=1, le=3600, description="interrupted after this long")] = 120,
    ) -> list[Any]:
        if language not in LANGUAGES:
            raise ToolError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
        try:
            sandbox = await CodeSandbox.connect(sandbox_id, **api_of(ctx).opts)
            execution = await sandbox.run_code(code, language=language, timeout=timeout_seconds)
        except Exception as e:
            raise ToolError(f"running the code failed: {e}") from None
        if execution.error is not None:
            raise ToolError(_cut(f"{execution.error.name}: {execution.error.value}\n{execution.error.traceback}"))
        parts: list[Any] = []
        text = []
        if execution.logs.stdout:
            text.append("stdout:\n" + "".join(execution.logs.stdout))
        if execution.logs.stderr:
            text.append("stderr:\n" + "".join(execution.logs.stderr))
        for result in execution.results:
            if result.png:
                parts.append(Image(data=base64.b64decode(result.png), format="png"))
            elif result.jpeg:
                parts.append(Image(data=base64.b64decode(result.jpeg), format="jpeg"))
            if result.text and not (result.png or result.jpeg):
                text.append(("result:\n" if result.is_main_result else "output:\n") + result.text)
            # A chart's data (e2b-charts reads matplotlib figures): what a model can reason about beside the image.
            if result.chart is not None:
                text.append("chart data:\n" + json.dumps(result.chart.to_dict(), default=str))
            elif result.json is not None:
                text.append("json:\n" + json.dumps(result.json, default=str))
        return [_cut("\n".join(text) or "(no output)"), *parts]

    @server.tool(description="Write a text file in a sandbox (parent directories are made).")
    async def write_file(ctx: Context, sandbox_id: SandboxId, path: FilePath,
                         content: Annotated[str, Field(description="the file's whole text")]) -> dict:
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        try:
            info = await sandbox.files.write(path, content)
        except Exception as e:
            raise ToolError(f"writing {path} failed: {e}") from None
        return {"path": info.path, "bytes": len(content.encode())}

    @server.tool(description="Read a text file from a sandbox.")
    async def read_file(ctx: Context, sandbox_id: SandboxId, path: FilePath) -> str:
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        try:
            return _cut(await sandbox.files.read(path))
        except Exception as e:
            raise ToolError(f"reading {path} failed: {e}") from None

    @server.tool(description="List a directory in a sandbox: names, types (file, dir) and sizes.")
    async def list_files(ctx: Context, sandbox_id: SandboxId, path: FilePath = "/home/user") -> list[dict]:
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        try:
            entries = await sandbox.files.list(path)
        except Exception as e:
            raise ToolError(f"listing {path} failed: {e}") from None
        return [{"name": e.name, "path": e.path, "type": getattr(e.type, "value", str(e.type)), "size": e.size}
                for e in entries]

    @server.tool(description="The public URL of a port a program listens on in the sandbox (an app, a server "
                             "the agent started), to open in a browser or fetch.")
    async def get_preview_url(
        ctx: Context,
        sandbox_id: SandboxId,
        port: Annotated[int, Field(ge=1, le=65535, description="the port the program listens on")],
    ) -> dict:
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        return {"url": f"https://{sandbox.get_host(port)}", "host": sandbox.get_host(port)}

    @server.tool(description="Pause a sandbox: it stops running and keeps its memory and files until resumed.")
    async def pause_sandbox(ctx: Context, sandbox_id: SandboxId) -> dict:
        await api_of(ctx).call("POST", f"/sandboxes/{sandbox_id}/pause")
        return {"sandbox_id": sandbox_id, "state": "paused"}

    @server.tool(description="Resume a paused sandbox (or extend a running one) for timeout_seconds.")
    async def resume_sandbox(
        ctx: Context,
        sandbox_id: SandboxId,
        timeout_seconds: Annotated[int, Field(ge=1, le=86400, description="it runs this long from now")] = 300,
    ) -> dict:
        await api_of(ctx).call("POST", f"/sandboxes/{sandbox_id}/connect", json={"timeout": timeout_seconds})
        return {"sandbox_id": sandbox_id, "state": "running"}

    @server.tool(description="Snapshot a sandbox (memory and files) under a name new sandboxes can start from "
                             "(create_sandbox with template=<name>).")
    async def snapshot_sandbox(
        ctx: Context,
        sandbox_id: SandboxId,
        name: Annotated[str | None, Field(description="a name to start from; none: only its id")] = None,
    ) -> dict:
        node = await api_of(ctx).call("POST", f"/sandboxes/{sandbox_id}/snapshots", json={"name": name} if name else {})
        return {"snapshot_id": node["snapshotID"], "name": name}

    @server.tool(description="Fork a running or paused sandbox into count independent copies of its current "
                             "state (memory, processes, files); returns their sandbox_ids.")
    async def fork_sandbox(
        ctx: Context,
        sandbox_id: SandboxId,
        count: Annotated[int, Field(ge=1, le=16, description="how many copies")] = 1,
    ) -> dict:
        results = await api_of(ctx).call("POST", f"/sandboxes/{sandbox_id}/fork", json={"count": count})
        return {"sandbox_ids": [r["sandbox"]["sandboxID"] for r in results if r.get("sandbox")],
                "errors": [r["error"]["message"] for r in results if r.get("error")]}

    @server.tool(description="Kill a sandbox: it ends now and its files go (snapshots stay).")
    async def kill_sandbox(ctx: Context, sandbox_id: SandboxId) -> dict:
        await api_of(ctx).call("DELETE", f"/sandboxes/{sandbox_id}")
        return {"sandbox_id": sandbox_id, "killed": True}

    # ------------------------------------------------------------------------------------------ desktop
    # As the e2b-desktop SDK drives a `desktop` sandbox: xdotool and the template's scrot on its X display.

    async def on_desktop(ctx: Context, sandbox_id: SandboxId, command: str, what: str) -> str:
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        try:
            result = await sandbox.commands.run(command, envs={"DISPLAY": DESKTOP_DISPLAY}, timeout=30)
        except CommandExitException as e:
            if "xdotool: command not found" in e.stderr or "scrot: command not found" in e.stderr:
                raise ToolError(f"sandbox {sandbox_id} has no desktop (create it from the `desktop` template)") \
                    from None
            raise ToolError(f"{what} failed: {(e.stderr or e.stdout).strip()}") from None
        except Exception as e:
            raise ToolError(f"{what} failed: {e}") from None
        return result.stdout

    @server.tool(description="Take a screenshot of a desktop sandbox's screen (PNG image, pointer drawn in).",
                 structured_output=False)
    async def desktop_screenshot(ctx: Context, sandbox_id: SandboxId) -> list[Any]:
        path = f"/tmp/corral-mcp-{uuid.uuid4().hex}.png"
        await on_desktop(ctx, sandbox_id, f"scrot -p {path}", "the screenshot")
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        try:
            png = bytes(await sandbox.files.read(path, format="bytes"))
        finally:
            await sandbox.files.remove(path)
        return [Image(data=png, format="png")]

    @server.tool(description="Click on a desktop sandbox's screen at (x, y) pixels from the top left: button "
                             "left, right or middle; double=true for a double click.")
    async def desktop_click(
        ctx: Context,
        sandbox_id: SandboxId,
        x: Annotated[int, Field(ge=0, description="pixels from the left edge")],
        y: Annotated[int, Field(ge=0, description="pixels from the top edge")],
        button: Annotated[Literal["left", "right", "middle"], Field(description="mouse button")] = "left",
        double: Annotated[bool, Field(description="a double click")] = False,
    ) -> dict:
        clicks = "--repeat 2 --delay 100 " if double else ""
        await on_desktop(ctx, sandbox_id, f"xdotool mousemove --sync {x} {y} click {clicks}{XDOTOOL_BUTTONS[button]}",
                         "the click")
        return {"clicked": [x, y], "button": button, "double": double}

    @server.tool(description="Type text on a desktop sandbox as a keyboard would, into the focused window.")
    async def desktop_type(ctx: Context, sandbox_id: SandboxId,
                           text: Annotated[str, Field(description="the text, as typed")]) -> dict:
        await on_desktop(ctx, sandbox_id, f"xdotool type --delay 12 -- {shlex.quote(text)}", "typing")
        return {"typed": len(text)}

    @server.tool(description="Press a key or key combination on a desktop sandbox, in X keysym names joined "
                             "by +: Return, Escape, Tab, BackSpace, ctrl+c, alt+F4, ctrl+shift+t.")
    async def desktop_press(ctx: Context, sandbox_id: SandboxId,
                            keys: Annotated[str, Field(description="one key or combination: Return, ctrl+s")]) -> dict:
        if not keys.strip() or any(c.isspace() for c in keys.strip()):
            raise ToolError("keys is one combination without spaces, e.g. ctrl+c or Return")
        await on_desktop(ctx, sandbox_id, f"xdotool key -- {shlex.quote(keys.strip())}", "the key press")
        return {"pressed": keys.strip()}

    @server.tool(description="Scroll a desktop sandbox's screen up or down by `amount` wheel steps, at the "
                             "pointer (or at x, y when given).")
    async def desktop_scroll(
        ctx: Context,
        sandbox_id: SandboxId,
        direction: Annotated[Literal["up", "down"], Field(description="which way")] = "down",
        amount: Annotated[int, Field(ge=1, le=100, description="wheel steps")] = 3,
        x: Annotated[int | None, Field(ge=0, description="move the pointer here first (with y)")] = None,
        y: Annotated[int | None, Field(ge=0, description="move the pointer here first (with x)")] = None,
    ) -> dict:
        move = f"mousemove --sync {x} {y} " if x is not None and y is not None else ""
        button = 4 if direction == "up" else 5
        await on_desktop(ctx, sandbox_id, f"xdotool {move}click --repeat {amount} {button}", "scrolling")
        return {"scrolled": direction, "amount": amount}

    # ---------------------------------------------------------------------------------------- resources

    @server.resource("corral://sandboxes/{sandbox_id}/files{+path}", mime_type="text/plain",
                     description="A text file in a sandbox, by its absolute path "
                                 "(corral://sandboxes/<id>/files/home/user/notes.txt).",
                     security=ResourceSecurity(exempt_params={"path"}))
    async def sandbox_file(ctx: Context, sandbox_id: SandboxId, path: FilePath) -> str:
        sandbox = await api_of(ctx).sandbox(sandbox_id)
        try:
            return _cut(await sandbox.files.read(path))
        except Exception as e:
            raise ToolError(f"reading {path} failed: {e}") from None

    @server.resource("corral://sandboxes/{sandbox_id}/logs", mime_type="text/plain",
                     description="A sandbox's logs: its start, its processes' lifecycle, envd's own lines.")
    async def sandbox_logs(ctx: Context, sandbox_id: SandboxId) -> str:
        answer = await api_of(ctx).call("GET", f"/v2/sandboxes/{sandbox_id}/logs", params={"limit": 1000})
        lines = [f"{e['timestamp']} {e.get('level', 'info'):5} {e['message']}" for e in answer.get("logs", [])]
        return _cut("\n".join(lines) or "(no log lines)")

    return server
