"""The dashboard's way into a running sandbox: envd's own HTTP and Connect endpoints at the sandbox's address,
with the sandbox's envd token, as the SDKs use them (no HTTP call to this server itself). Only for a sandbox
the viewer's team owns (pages look the row up with the viewer's owner first) and a key with `execute`.

- files: `list_dir` (Filesystem/ListDir), `download` (GET /files, streamed), `upload` (POST /files, multipart)
- terminal: `Pty` — Process/Start with a PTY (a streamed answer), Process/SendInput, Process/Update (resize),
  Process/SendSignal (SIGKILL when the browser goes)
- `run`: a command to its end (the desktop view starts its VNC server with it)"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from corral.connect_framing import connect_envelopes
from corral.envd import DEFAULT_PORT as ENVD_PORT

CONNECT_JSON = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}


class EnvdError(Exception):
    """envd refused or failed a request, or is unreachable: the message says which, for a person."""


def refused(answer: httpx.Response) -> None:
    """Raises EnvdError with envd's message when it did not answer 200."""
    if answer.status_code != 200:
        try:
            detail = answer.json().get("message") or answer.text
        except ValueError:
            detail = answer.text
        raise EnvdError(detail[:300] or f"envd answered {answer.status_code}")


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    is_dir: bool
    size: int
    modified: str  # RFC 3339, as envd gives it
    permissions: str
    symlink: str | None


def _envelope(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(body)) + body


class SandboxEnvd:
    """One sandbox's envd: `address` on the host's network, `token` its access token."""

    def __init__(self, address: str, token: str, user: str | None = None) -> None:
        self.base = f"http://{address}:{ENVD_PORT}"
        self.headers = {"X-Access-Token": token}
        if user:
            self.headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
        # Sandbox addresses are on the host's own veths: no proxy from the environment applies.
        self.client = httpx.AsyncClient(base_url=self.base, headers=self.headers, trust_env=False,
                                        timeout=httpx.Timeout(30.0, connect=5.0))

    async def close(self) -> None:
        await self.client.aclose()

    async def __aenter__(self) -> SandboxEnvd:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def _unary(self, method: str, message: dict) -> dict:
        try:
            answer = await self.client.post(f"/{method}", content=json.dumps(message), headers=CONNECT_JSON)
        except httpx.TransportError as e:
            raise EnvdError(f"the sandbox's envd is unreachable ({e.__class__.__name__})") from e
        refused(answer)
        return answer.json()

    # --- files -------------------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[Entry]:
        answer = await self._unary("filesystem.Filesystem/ListDir", {"path": path, "depth": 1})
        entries = [Entry(name=e.get("name", ""), path=e.get("path", ""),
                         is_dir=e.get("type") == "FILE_TYPE_DIRECTORY", size=int(e.get("size") or 0),
                         modified=e.get("modifiedTime", ""), permissions=e.get("permissions", ""),
                         symlink=e.get("symlinkTarget")) for e in answer.get("entries", [])]
        return sorted(entries, key=lambda e: (not e.is_dir, e.name.lower()))

    @contextlib.asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[httpx.Response]:
        """The open answer of GET /files (its body not read yet); EnvdError when envd refuses."""
        request = self.client.build_request("GET", "/files", params={"path": path}, timeout=httpx.Timeout(
            None, connect=5.0))
        try:
            answer = await self.client.send(request, stream=True)
        except httpx.TransportError as e:
            raise EnvdError(f"the sandbox's envd is unreachable ({e.__class__.__name__})") from e
        try:
            if answer.status_code != 200:
                await answer.aread()
                try:
                    detail = answer.json().get("message") or answer.text
                except ValueError:
                    detail = answer.text
                raise EnvdError(detail[:300])
            yield answer
        finally:
            await answer.aclose()

    async def upload(self, path: str, name: str, content: AsyncIterator[bytes] | bytes) -> None:
        """Writes a file at `path` (its directories made as envd makes them)."""
        try:
            answer = await self.client.post("/files", params={"path": path},
                                            files={"file": (name, content if isinstance(content, bytes)
                                                            else b"".join([c async for c in content]))})
        except httpx.TransportError as e:
            raise EnvdError(f"the sandbox's envd is unreachable ({e.__class__.__name__})") from e
        refused(answer)

    # --- processes ---------------------------------------------------------------------------------

    async def run(self, argv: list[str], *, timeout: float = 30.0) -> tuple[int, bytes]:
        """Runs a command to its end: (exit code, stdout and stderr)."""
        body = {"process": {"cmd": argv[0], "args": argv[1:]}, "stdin": False}
        try:
            answer = await self.client.post("/process.Process/Start", content=_envelope(body), timeout=timeout,
                                            headers={"Content-Type": "application/connect+json"})
        except httpx.TransportError as e:
            raise EnvdError(f"the sandbox's envd is unreachable ({e.__class__.__name__})") from e
        if answer.status_code != 200:
            raise EnvdError(f"envd refused the command: {answer.text[:300]}")
        output, code = bytearray(), None
        for flags, message in connect_envelopes([answer.content]):
            if flags & 0x02:
                if error := message.get("error"):
                    raise EnvdError(f"envd failed the command: {error.get('message')}")
                break
            event = message.get("event", {})
            if data := event.get("data"):
                output += base64.b64decode(data.get("stdout", "") or data.get("stderr", ""))
            elif (end := event.get("end")) is not None:
                code = end.get("exitCode", 0) if end.get("exited", False) else 137
        return (code if code is not None else -1), bytes(output)

    def pty(self, cols: int, rows: int) -> Pty:
        return Pty(self, cols, rows)


class Pty:
    """A login shell on a PTY in the sandbox, as the SDK's `sandbox.pty.create` starts it. `output()` yields
    what it prints until it ends; `exit_code` is set then."""

    def __init__(self, envd: SandboxEnvd, cols: int, rows: int) -> None:
        self.envd, self.cols, self.rows = envd, cols, rows
        self.pid: int | None = None
        self.exit_code: int | None = None

    async def output(self) -> AsyncIterator[bytes]:
        body = {"process": {"cmd": "/bin/bash", "args": ["-i", "-l"],
                            "envs": {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}},
                "pty": {"size": {"cols": self.cols, "rows": self.rows}}}
        request = self.envd.client.build_request(
            "POST", "/process.Process/Start", content=_envelope(body),
            headers={"Content-Type": "application/connect+json", "Keepalive-Ping-Interval": "30"},
            timeout=httpx.Timeout(None, connect=5.0))
        try:
            answer = await self.envd.client.send(request, stream=True)
        except httpx.TransportError as e:
            raise EnvdError(f"the sandbox's envd is unreachable ({e.__class__.__name__})") from e
        try:
            if answer.status_code != 200:
                await answer.aread()
                raise EnvdError(f"envd refused the terminal: {answer.text[:300]}")
            buffer = b""
            async for chunk in answer.aiter_raw():
                buffer += chunk
                while len(buffer) >= 5:
                    flags, length = struct.unpack(">BI", buffer[:5])
                    if len(buffer) < 5 + length:
                        break
                    message = json.loads(buffer[5:5 + length] or b"{}")
                    buffer = buffer[5 + length:]
                    if flags & 0x02:
                        if error := message.get("error"):
                            raise EnvdError(f"the terminal failed: {error.get('message')}")
                        return
                    event = message.get("event", {})
                    if (start := event.get("start")) is not None:
                        self.pid = int(start.get("pid", 0))
                    elif (data := event.get("data")) is not None:
                        raw = data.get("pty") or data.get("stdout") or data.get("stderr")
                        if raw:
                            yield base64.b64decode(raw)
                    elif (end := event.get("end")) is not None:
                        self.exit_code = end.get("exitCode", 0)
        except httpx.TransportError as e:
            raise EnvdError(f"the terminal's connection to envd broke ({e.__class__.__name__})") from e
        finally:
            await answer.aclose()

    async def write(self, data: bytes) -> None:
        if self.pid is not None:
            await self.envd._unary("process.Process/SendInput", {
                "process": {"pid": self.pid}, "input": {"pty": base64.b64encode(data).decode()}})

    async def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        if self.pid is not None:
            await self.envd._unary("process.Process/Update", {
                "process": {"pid": self.pid}, "pty": {"size": {"cols": cols, "rows": rows}}})

    async def kill(self) -> None:
        if self.pid is not None and self.exit_code is None:
            with contextlib.suppress(EnvdError):
                await self.envd._unary("process.Process/SendSignal",
                                       {"process": {"pid": self.pid}, "signal": "SIGNAL_SIGKILL"})
