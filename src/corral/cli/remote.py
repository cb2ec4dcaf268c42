"""`corral sandbox ls|create|info|kill|exec|logs`: the server's API from the command line."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import sys
import time

import httpx
import typer
from rich.console import Console
from rich.table import Table

from corral.connect_framing import connect_envelopes

console = Console()
err_console = Console(stderr=True)

UrlOption = typer.Option(None, "--url", help="Server URL (E2B_API_URL; default http://127.0.0.1:3000).")
KeyOption = typer.Option(None, "--api-key", help="API key (E2B_API_KEY).")
JsonOption = typer.Option(False, "--json", help="Print JSON.")


class Api:
    def __init__(self, url: str | None, key: str | None) -> None:
        self.url = (url or os.environ.get("E2B_API_URL") or "http://127.0.0.1:3000").rstrip("/")
        key = key or os.environ.get("E2B_API_KEY")
        if not key:
            _fail("no API key: pass --api-key or set E2B_API_KEY (create one with `corral keys create`)")
        self.client = httpx.Client(base_url=self.url, headers={"X-API-KEY": key}, timeout=60, trust_env=False)

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            _fail(f"cannot reach {self.url}: {e} (is `corral serve` running?)")
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            _fail(f"{response.status_code}: {message}")
        return response


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def sandbox_ls(url: str = UrlOption, api_key: str = KeyOption, as_json: bool = JsonOption,
               metadata: list[str] = typer.Option([], "--metadata", "-m", help="key=value filter, repeatable.")):
    """List your sandboxes."""
    query = {}
    if metadata:
        from urllib.parse import quote, urlencode

        pairs = dict(item.split("=", 1) for item in metadata)
        query["metadata"] = urlencode({quote(k): quote(v) for k, v in pairs.items()})
    rows = Api(url, api_key).call("GET", "/v2/sandboxes", params=query).json()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("id", "template", "state", "started", "ends", "metadata")
    for r in rows:
        table.add_row(r["sandboxID"], r["templateID"], r["state"], r["startedAt"], r["endAt"],
                      ", ".join(f"{k}={v}" for k, v in (r.get("metadata") or {}).items()))
    console.print(table)


def sandbox_create(template: str = typer.Argument("base"), url: str = UrlOption, api_key: str = KeyOption,
                   timeout: int = typer.Option(300, help="Seconds until the sandbox is killed."),
                   metadata: list[str] = typer.Option([], "--metadata", "-m", help="key=value, repeatable."),
                   env: list[str] = typer.Option([], "--env", "-e", help="KEY=value for every process."),
                   internet: bool = typer.Option(True, "--internet/--no-internet"),
                   as_json: bool = JsonOption):
    """Create a sandbox and print its id."""
    body = {"templateID": template, "timeout": timeout, "allow_internet_access": internet,
            "metadata": dict(m.split("=", 1) for m in metadata), "envVars": dict(e.split("=", 1) for e in env)}
    created = Api(url, api_key).call("POST", "/v2/sandboxes", json=body).json()
    print(json.dumps(created, indent=1) if as_json else created["sandboxID"])


def sandbox_info(sandbox_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption,
                 as_json: bool = JsonOption):
    """Show one sandbox."""
    info = Api(url, api_key).call("GET", f"/sandboxes/{sandbox_id}").json()
    info.pop("envdAccessToken", None)
    if as_json:
        print(json.dumps(info, indent=1))
        return
    table = Table("field", "value", show_header=False)
    for k, v in info.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict | list) else str(v))
    console.print(table)


def sandbox_kill(sandbox_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption):
    """Kill a sandbox now."""
    Api(url, api_key).call("DELETE", f"/sandboxes/{sandbox_id}")
    print(f"killed {sandbox_id}")


def sandbox_exec(sandbox_id: str = typer.Argument(...), command: list[str] = typer.Argument(...),
                 url: str = UrlOption, api_key: str = KeyOption,
                 user: str = typer.Option(None, help="Run as this user (default: the sandbox's)."),
                 cwd: str = typer.Option(None, help="Working directory.")):
    """Run a command in a sandbox (through `bash -l -c`, like the SDK), stream its output, exit with its code."""
    api = Api(url, api_key)
    token = api.call("GET", f"/sandboxes/{sandbox_id}").json().get("envdAccessToken")
    if command and command[0] == "--":
        command = command[1:]
    script = command[0] if len(command) == 1 else " ".join(command)
    process: dict = {"cmd": "/bin/bash", "args": ["-l", "-c", script]}
    if cwd:
        process["cwd"] = cwd
    payload = json.dumps({"process": process, "stdin": False}).encode()
    headers = {"Content-Type": "application/connect+json", "E2b-Sandbox-Id": sandbox_id,
               "E2b-Sandbox-Port": "49983"}
    if token:
        headers["X-Access-Token"] = token
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
    exit_code = 1
    with httpx.Client(timeout=None, trust_env=False) as client, client.stream(
            "POST", f"{api.url}/process.Process/Start", headers=headers,
            content=struct.pack(">BI", 0, len(payload)) + payload) as response:
        if response.status_code != 200:
            _fail(f"{response.status_code}: {response.read().decode(errors='replace')}")
        for flags, message in connect_envelopes(response.iter_bytes()):
            if flags & 0x02:
                if error := message.get("error"):
                    _fail(f"{error.get('code')}: {error.get('message')}")
                break
            event = message.get("event", {})
            if data := event.get("data"):
                for stream, out in (("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer)):
                    if stream in data:
                        out.write(base64.b64decode(data[stream]))
                        out.flush()
            elif end := event.get("end"):
                exit_code = end.get("exitCode", 0) if end.get("exited", False) else 128 + 9
    raise typer.Exit(exit_code)


def sandbox_logs(sandbox_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption,
                 follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the "
                                                                           "sandbox is killed (Ctrl-C stops)."),
                 every: float = typer.Option(1.0, "--every", help="With --follow: seconds between looks.")):
    """Print what envd and the template's start command printed in a sandbox (its last 1000 lines)."""
    api = Api(url, api_key)
    with contextlib.suppress(KeyboardInterrupt):
        _print_logs(api, sandbox_id, follow, every)


def _print_logs(api: Api, sandbox_id: str, follow: bool, every: float) -> None:
    printed: dict[str, int] = {}  # source -> lines of it printed so far
    while True:
        response = api.client.get(f"/v2/sandboxes/{sandbox_id}/logs",
                                  params={"direction": "backward", "limit": 1000})
        if follow and printed and response.status_code == 404:
            err_console.print(f"sandbox {sandbox_id} is gone")
            return
        if response.status_code >= 400:
            api.call("GET", f"/v2/sandboxes/{sandbox_id}/logs")  # says why and exits
        for entry in _new_lines(reversed(response.json()["logs"]), printed):
            print(entry["message"], flush=True)
        if not follow:
            return
        time.sleep(every)


def _new_lines(entries, printed: dict[str, int]) -> list[dict]:
    """The entries not printed yet, by each source's line numbers. A source whose lines now end before what
    was printed started anew (a resumed sandbox runs in a new container): all of it is new."""
    entries = list(entries)
    by_source: dict[str, list[dict]] = {}
    for entry in entries:
        by_source.setdefault(entry["fields"].get("source", ""), []).append(entry)
    fresh = []
    for source, lines in by_source.items():
        numbers = [int(e["fields"].get("line", 0)) for e in lines]
        seen = printed.get(source, 0)
        if max(numbers) < seen:
            seen = 0
        fresh += [e for e, n in zip(lines, numbers, strict=True) if n > seen]
        printed[source] = max(numbers)
    return sorted(fresh, key=lambda e: (e["fields"].get("source") != "runtime", int(e["fields"].get("line", 0))))
