"""`corral mcp`: an MCP server (the official `mcp` SDK's MCPServer) whose tools are Corral's sandboxes, for
any agent that speaks MCP. It is a client of a Corral server like the SDKs: lifecycle calls go to the REST
API, commands, files and code to the sandbox's envd through the unmodified e2b SDKs. A failure (a command's
non-zero exit aside, which is a result) comes back as a tool error the model can read and act on, never as
a crash of this server."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import httpx
from e2b import AsyncSandbox, CommandExitException
from e2b_code_interpreter import AsyncSandbox as CodeSandbox
from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

INSTRUCTIONS = """Corral sandboxes are isolated Linux computers. Create one (template `base` for commands and
files, `code-interpreter-v1` to run Python/JavaScript/bash code with charts, `desktop` for a desktop), then run
commands or code and read or write files in it by its sandbox_id. Sandboxes end at their timeout unless killed
earlier; pause one to keep it (memory included) without it running, resume it later; fork one to explore
alternatives from the same state."""

LANGUAGES = ("python", "js", "ts", "bash", "r", "java")
MAX_TEXT = 100_000  # characters of output returned at once; the rest is cut with a note


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


def build_server(api_url: str, api_key: str, domain: str | None = None) -> MCPServer:
    api = CorralApi(api_url, api_key, domain)
    server = MCPServer("corral", instructions=INSTRUCTIONS)

    @server.tool(description="Create a sandbox from a template; returns its sandbox_id. Templates: base "
                             "(commands, files), code-interpreter-v1 (run_code), desktop, or one of yours.")
    async def create_sandbox(
        template: Annotated[str, Field(description="template name")] = "base",
        timeout_seconds: Annotated[int, Field(ge=1, le=86400, description="it ends after this long")] = 300,
        env: Annotated[dict[str, str] | None, Field(description="environment variables for its commands")] = None,
        metadata: Annotated[dict[str, str] | None, Field(description="labels to find it by")] = None,
    ) -> dict:
        created = await api.call("POST", "/v2/sandboxes", json={"templateID": template, "timeout": timeout_seconds,
                                                                "envVars": env or {}, "metadata": metadata or {}})
        return {"sandbox_id": created["sandboxID"], "template": template, "timeout_seconds": timeout_seconds}

    @server.tool(description="List this key's team's sandboxes (running and paused) with their state.")
    async def list_sandboxes() -> list[dict]:
        listed = await api.call("GET", "/v2/sandboxes", params={"state": "running,paused"})
        return [{"sandbox_id": s["sandboxID"], "template": s.get("alias") or s["templateID"], "state": s["state"],
                 "started_at": s["startedAt"], "ends_at": s["endAt"], "metadata": s.get("metadata") or {}}
                for s in listed]

    @server.tool(description="Run a shell command (bash) in a sandbox; returns stdout, stderr and exit_code "
                             "(a non-zero exit is a result, not an error). background=true returns at once "
                             "with the process id.")
    async def run_command(
        sandbox_id: str,
        command: str,
        timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 60,
        background: bool = False,
        cwd: str | None = None,
        user: Annotated[str, Field(description="user or root")] = "user",
    ) -> dict:
        sandbox = await api.sandbox(sandbox_id)
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
                             "as images. A failing cell returns its error and traceback as a tool error.",
                 structured_output=False)
    async def run_code(
        sandbox_id: str,
        code: str,
        language: Annotated[str, Field(description=", ".join(LANGUAGES))] = "python",
        timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 120,
    ) -> list[Any]:
        if language not in LANGUAGES:
            raise ToolError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
        try:
            sandbox = await CodeSandbox.connect(sandbox_id, **api.opts)
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
        return [_cut("\n".join(text) or "(no output)"), *parts]

    @server.tool(description="Write a text file in a sandbox (parent directories are made).")
    async def write_file(sandbox_id: str, path: str, content: str) -> dict:
        sandbox = await api.sandbox(sandbox_id)
        try:
            info = await sandbox.files.write(path, content)
        except Exception as e:
            raise ToolError(f"writing {path} failed: {e}") from None
        return {"path": info.path, "bytes": len(content.encode())}

    @server.tool(description="Read a text file from a sandbox.")
    async def read_file(sandbox_id: str, path: str) -> str:
        sandbox = await api.sandbox(sandbox_id)
        try:
            return _cut(await sandbox.files.read(path))
        except Exception as e:
            raise ToolError(f"reading {path} failed: {e}") from None

    @server.tool(description="List a directory in a sandbox: names, types (file, dir) and sizes.")
    async def list_files(sandbox_id: str, path: str = "/home/user") -> list[dict]:
        sandbox = await api.sandbox(sandbox_id)
        try:
            entries = await sandbox.files.list(path)
        except Exception as e:
            raise ToolError(f"listing {path} failed: {e}") from None
        return [{"name": e.name, "path": e.path, "type": getattr(e.type, "value", str(e.type)), "size": e.size}
                for e in entries]

    @server.tool(description="The public URL of a port a program listens on in the sandbox (an app, a server "
                             "the agent started), to open in a browser or fetch.")
    async def get_preview_url(sandbox_id: str, port: Annotated[int, Field(ge=1, le=65535)]) -> dict:
        sandbox = await api.sandbox(sandbox_id)
        return {"url": f"https://{sandbox.get_host(port)}", "host": sandbox.get_host(port)}

    @server.tool(description="Pause a sandbox: it stops running and keeps its memory and files until resumed.")
    async def pause_sandbox(sandbox_id: str) -> dict:
        await api.call("POST", f"/sandboxes/{sandbox_id}/pause")
        return {"sandbox_id": sandbox_id, "state": "paused"}

    @server.tool(description="Resume a paused sandbox (or extend a running one) for timeout_seconds.")
    async def resume_sandbox(sandbox_id: str, timeout_seconds: Annotated[int, Field(ge=1, le=86400)] = 300) -> dict:
        await api.call("POST", f"/sandboxes/{sandbox_id}/connect", json={"timeout": timeout_seconds})
        return {"sandbox_id": sandbox_id, "state": "running"}

    @server.tool(description="Snapshot a sandbox (memory and files) under a name new sandboxes can start from "
                             "(create_sandbox with template=<name>).")
    async def snapshot_sandbox(sandbox_id: str, name: str | None = None) -> dict:
        node = await api.call("POST", f"/sandboxes/{sandbox_id}/snapshots", json={"name": name} if name else {})
        return {"snapshot_id": node["snapshotID"], "name": name}

    @server.tool(description="Fork a running or paused sandbox into count independent copies of its current "
                             "state (memory, processes, files); returns their sandbox_ids.")
    async def fork_sandbox(sandbox_id: str, count: Annotated[int, Field(ge=1, le=16)] = 1) -> dict:
        results = await api.call("POST", f"/sandboxes/{sandbox_id}/fork", json={"count": count})
        return {"sandbox_ids": [r["sandbox"]["sandboxID"] for r in results if r.get("sandbox")],
                "errors": [r["error"]["message"] for r in results if r.get("error")]}

    @server.tool(description="Kill a sandbox: it ends now and its files go (snapshots stay).")
    async def kill_sandbox(sandbox_id: str) -> dict:
        await api.call("DELETE", f"/sandboxes/{sandbox_id}")
        return {"sandbox_id": sandbox_id, "killed": True}

    return server
