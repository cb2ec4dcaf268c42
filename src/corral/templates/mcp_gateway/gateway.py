"""mcp-gateway: the MCP servers a sandbox's creator asked for, behind one endpoint.

The E2B SDK's `Sandbox.create(mcp={...})` runs, as root, `mcp-gateway --config '<json>'` with
GATEWAY_ACCESS_TOKEN set, and expects it to exit 0 once a Streamable HTTP MCP endpoint answers on port 50005
at /mcp behind that bearer token, with the token in /etc/mcp-gateway/.token (docs/mcp.md). This program starts
each server of the config over stdio (the MCP SDK's client), and serves the union of their tools, each named
`<server>__<tool>` so two servers' tools cannot collide (the MCP SDK's low-level server).

Commands: `--config <json>` (start, in the background; a config it cannot satisfy exits 1 with the reason),
`pull <name>...` (install catalogue servers now, as a template build does), `stop`, `list` (the catalogue).
It runs inside the sandbox and imports nothing of Corral's host side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PORT = 50005
PATH = "/mcp"
TOKEN_FILE = Path("/etc/mcp-gateway/.token")
RUN_DIR = Path("/run/mcp-gateway")  # the running gateway's state (with its token), pid and status
LOG = Path("/var/log/mcp-gateway.log")
GITHUB_DIR = Path("/opt/mcp-gateway/github")
SEPARATOR = "__"  # between a server's prefix and its tool's own name
START_TIMEOUT_S = 50.0  # the SDK waits 60 s for `--config`
INSTALL_TIMEOUT_S = 600.0


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Known:
    """A server of the catalogue: where it comes from and how its config becomes its command line."""

    summary: str
    package: str  # "npm:<name>@<version>" or "pypi:<name>==<version>"
    program: str  # an npm package's command, or a Python module run with `python3 -m`
    options: dict[str, str] = field(default_factory=dict)  # config key -> command-line flag
    required: str | None = None  # a config key holding a list of arguments that must be there

    def installed(self) -> bool:
        if self.package.startswith("npm:"):
            return shutil.which(self.program) is not None
        return importlib.util.find_spec(self.program) is not None

    def install_command(self) -> list[str]:
        kind, _, spec = self.package.partition(":")
        if kind == "npm":
            return ["npm", "install", "--global", "--no-audit", "--no-fund", spec]
        return [sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", spec]

    def command(self, config: dict) -> list[str]:
        base = [self.program] if self.package.startswith("npm:") else [sys.executable, "-m", self.program]
        unknown = set(config) - set(self.options) - ({self.required} if self.required else set())
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} (known: "
                              f"{', '.join(sorted([*self.options, *([self.required] if self.required else [])]))})")
        args = []
        for key, flag in self.options.items():
            value = config.get(key)
            if value is True:
                args.append(flag)
            elif value not in (None, False):
                args += [flag, str(value)]
        if self.required:
            values = config.get(self.required)
            if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"needs `{self.required}`: a non-empty list of strings")
            args += values
        return base + args


# Reference servers of the MCP project that run here without images or accounts; the template has them.
CATALOGUE: dict[str, Known] = {
    "filesystem": Known("read, write and search files under the given paths",
                        "npm:@modelcontextprotocol/server-filesystem@2026.8.31", "mcp-server-filesystem",
                        required="paths"),
    "memory": Known("a knowledge graph kept in a file", "npm:@modelcontextprotocol/server-memory@2026.8.31",
                    "mcp-server-memory"),
    "sequentialthinking": Known("step-by-step problem solving",
                                "npm:@modelcontextprotocol/server-sequential-thinking@2026.8.31",
                                "mcp-server-sequential-thinking"),
    "fetch": Known("fetch a URL as markdown", "pypi:mcp-server-fetch==2026.10.24", "mcp_server_fetch",
                   options={"userAgent": "--user-agent", "ignoreRobotsTxt": "--ignore-robots-txt",
                            "proxyUrl": "--proxy-url"}),
    "time": Known("current time and time zone conversion", "pypi:mcp-server-time==2026.10.19", "mcp_server_time",
                  options={"localTimezone": "--local-timezone"}),
}
GITHUB = re.compile(r"^github/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)$")


@dataclass
class Launch:
    """One server of a config, resolved: how to install it (if it must be) and start it."""

    name: str
    prefix: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    install: list[str] | None = None  # argv, run before the gateway starts
    shell_install: str | None = None  # a github entry's install_cmd
    clone: str | None = None  # a github entry's repository


def plan(config: Any) -> list[Launch]:
    """The launches of a config, or ConfigError naming every entry that cannot be satisfied."""
    if not isinstance(config, dict):
        raise ConfigError("the config must be a JSON object of server name -> settings")
    launches, problems, prefixes = [], [], set()
    for name, settings in config.items():
        try:
            if not isinstance(settings, dict):
                raise ConfigError("its settings must be a JSON object")
            launch = _launch(name, settings)
        except ConfigError as e:
            problems.append(f"{name}: {e}")
            continue
        while launch.prefix in prefixes:
            launch.prefix += "_"
        prefixes.add(launch.prefix)
        launches.append(launch)
    if problems:
        raise ConfigError("\n".join(problems))
    return launches


def _launch(name: str, settings: dict) -> Launch:
    if (repo := GITHUB.match(name)) is not None:
        owner, project = repo.groups()
        run_cmd, install_cmd, envs = settings.get("run_cmd"), settings.get("install_cmd"), settings.get("envs", {})
        unknown = set(settings) - {"run_cmd", "install_cmd", "envs"}
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))} (known: run_cmd, install_cmd, envs)")
        if not isinstance(run_cmd, str) or not run_cmd.strip():
            raise ConfigError("needs `run_cmd`: the command that starts the server on stdio")
        if install_cmd is not None and not isinstance(install_cmd, str):
            raise ConfigError("`install_cmd` must be a string")
        if not isinstance(envs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in envs.items()):
            raise ConfigError("`envs` must map names to strings")
        where = GITHUB_DIR / owner / project
        return Launch(name, re.sub(r"[^A-Za-z0-9_-]", "-", f"{owner}_{project}"), ["/bin/bash", "-lc", run_cmd],
                      env=envs, cwd=str(where), shell_install=install_cmd, clone=f"https://github.com/{owner}/{project}")
    known = CATALOGUE.get(name)
    if known is None:
        raise ConfigError(f"not a server this gateway can run: it runs {', '.join(sorted(CATALOGUE))}, and "
                          "`github/<owner>/<repo>` entries with a run_cmd (E2B's other catalogue servers are "
                          "Docker images, which a sandbox cannot run)")
    return Launch(name, name, known.command(settings), install=None if known.installed() else known.install_command())


def _run_install(argv: list[str], what: str, cwd: str | None = None, env: dict | None = None) -> None:
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{what}: did not finish in {INSTALL_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise ConfigError(f"{what}: {e}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise ConfigError(f"{what} failed (exit {done.returncode}): {tail}")


def install(launch: Launch) -> None:
    """What a launch needs before it can start: a catalogue server's package, a github entry's checkout and
    install_cmd."""
    if launch.install:
        _run_install(launch.install, f"{launch.name}: installing {' '.join(launch.install[-1:])}")
    if launch.cwd is not None:
        where = Path(launch.cwd)
        if not where.exists() and launch.clone:
            where.parent.mkdir(parents=True, exist_ok=True)
            # A sandbox may not reach GitHub; then the entry's install_cmd works in an empty directory
            # (installing from a package registry, say).
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(["git", "clone", "--quiet", "--depth", "1", launch.clone, str(where)],
                               capture_output=True, timeout=60, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
            if not where.exists():
                print(f"mcp-gateway: {launch.name}: could not clone {launch.clone}; running its commands in an "
                      "empty directory", file=sys.stderr)
        where.mkdir(parents=True, exist_ok=True)
        if launch.shell_install:
            _run_install(["/bin/bash", "-lc", launch.shell_install], f"{launch.name}: install_cmd", cwd=launch.cwd,
                         env={**os.environ, **launch.env})


def stop() -> bool:
    """Stop a running gateway; whether one ran."""
    pid_file = RUN_DIR / "pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def configure(raw: str, port: int) -> int:
    """`--config`: check and install what the config names, then start the gateway in the background and
    wait until it serves (exit 0) or fails (exit 1, the reason on stderr)."""
    try:
        launches = plan(json.loads(raw))
        for launch in launches:
            install(launch)
    except json.JSONDecodeError as e:
        print(f"mcp-gateway: the config is not JSON: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"mcp-gateway: cannot start: {e}", file=sys.stderr)
        return 1
    stop()
    token = os.environ.get("GATEWAY_ACCESS_TOKEN") or str(uuid.uuid4())
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = RUN_DIR / "state.json"
    status = RUN_DIR / "status.json"
    status.unlink(missing_ok=True)
    _write_private(state, json.dumps({"token": token, "port": port, "launches": [asdict(x) for x in launches]}))
    TOKEN_FILE.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(TOKEN_FILE, token)
    with open(LOG, "ab") as log:
        daemon = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "serve", str(state)],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                  close_fds=True)
    (RUN_DIR / "pid").write_text(str(daemon.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if status.exists():
            answer = json.loads(status.read_text())
            if "error" in answer:
                stop()
                print(f"mcp-gateway: cannot start: {answer['error']}", file=sys.stderr)
                return 1
            print(f"mcp-gateway: serving {answer['tools']} tools of {len(launches)} server(s) on "
                  f"http://0.0.0.0:{port}{PATH}")
            return 0
        if daemon.poll() is not None:
            print(f"mcp-gateway: the gateway exited ({daemon.returncode}); see {LOG}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    stop()
    print(f"mcp-gateway: the servers did not start within {START_TIMEOUT_S:.0f} s; see {LOG}", file=sys.stderr)
    return 1


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------ the daemon

async def serve(state_path: Path) -> int:
    import uvicorn
    from mcp import Client, types
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from mcp.server.lowlevel import Server
    from mcp.server.transport_security import TransportSecuritySettings

    state = json.loads(state_path.read_text())
    status = state_path.parent / "status.json"
    launches = [Launch(**x) for x in state["launches"]]
    tools: dict[str, tuple[Any, types.Tool]] = {}  # public name -> (client, the server's own tool)

    async with contextlib.AsyncExitStack() as stack:
        for launch in launches:
            errors = state_path.parent / f"{launch.prefix}.stderr"
            errlog = stack.enter_context(open(errors, "w+"))  # noqa: SIM115 - the stack closes it
            params = StdioServerParameters(command=launch.command[0], args=launch.command[1:],
                                           env={**os.environ, **launch.env}, cwd=launch.cwd)
            # No timeout here: `--config` waits START_TIMEOUT_S for the status and stops this process after.
            try:
                client = await stack.enter_async_context(Client(stdio_client(params, errlog=errlog)))
                cursor = None
                while True:
                    listed = await client.list_tools(cursor=cursor)
                    for tool in listed.tools:
                        tools[f"{launch.prefix}{SEPARATOR}{tool.name}"] = (client, tool)
                    if not (cursor := listed.next_cursor):
                        break
            except Exception as e:  # every way a server fails to start is reported
                errlog.flush()
                said = errors.read_text().strip()[-1500:]
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                _write_private(status, json.dumps({"error": f"server {launch.name} did not start ({reason})"
                                                            + (f": {said}" if said else "")}))
                return 1

        async def list_tools(ctx, params) -> types.ListToolsResult:
            return types.ListToolsResult(tools=[tool.model_copy(update={"name": name})
                                                for name, (_, tool) in tools.items()])

        async def call_tool(ctx, params) -> types.CallToolResult:
            found = tools.get(params.name)
            if found is None:
                return types.CallToolResult(content=[types.TextContent(
                    type="text", text=f"unknown tool {params.name!r}")], is_error=True)
            client, tool = found
            return await client.call_tool(tool.name, params.arguments or {})

        server = Server("corral-mcp-gateway", on_list_tools=list_tools, on_call_tool=call_tool)
        app = server.streamable_http_app(
            streamable_http_path=PATH,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        token = state["token"].encode()

        async def bearer_only(scope, receive, send) -> None:
            if scope["type"] == "http":
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, b"Bearer " + token):
                    body = b'{"error":"unauthorized: send Authorization: Bearer <the gateway token>"}'
                    await send({"type": "http.response.start", "status": 401, "headers": [
                        (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                    await send({"type": "http.response.body", "body": body})
                    return
            await app(scope, receive, send)

        web = uvicorn.Server(uvicorn.Config(bearer_only, host="0.0.0.0", port=state["port"], log_level="warning",
                                            lifespan="on"))
        serving = asyncio.create_task(web.serve())
        while not web.started and not serving.done():  # noqa: ASYNC110 - uvicorn sets a flag, no event
            await asyncio.sleep(0.02)
        if serving.done():
            _write_private(status, json.dumps({"error": f"cannot listen on port {state['port']}"}))
            return 1
        _write_private(status, json.dumps({"tools": len(tools)}))
        await serving
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON: server name -> settings; starts the gateway in the background")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("command", nargs="?", choices=["pull", "stop", "list", "serve"])
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    if args.config is not None:
        return configure(args.config, args.port)
    if args.command == "pull":
        try:
            for name in args.names:
                if name not in CATALOGUE:
                    raise ConfigError(f"{name}: not in the catalogue ({', '.join(sorted(CATALOGUE))})")
                if not CATALOGUE[name].installed():
                    _run_install(CATALOGUE[name].install_command(), f"{name}: installing")
                print(f"{name}: installed")
        except ConfigError as e:
            print(f"mcp-gateway: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "stop":
        return 0 if stop() else 1
    if args.command == "list":
        for name, known in sorted(CATALOGUE.items()):
            print(f"{name:20} {'installed' if known.installed() else 'not installed':14} {known.summary}")
        return 0
    if args.command == "serve" and len(args.names) == 1:
        return asyncio.run(serve(Path(args.names[0])))
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
