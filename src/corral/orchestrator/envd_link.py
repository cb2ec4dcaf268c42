"""The host's side of envd's internal endpoints: /init after every start or restore, /metrics, /health."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import struct
from collections.abc import Awaitable, Callable

import httpx

from corral.connect_framing import connect_envelopes
from corral.envd import DEFAULT_PORT as ENVD_PORT
from corral.network.connections import port_accepts
from corral.runtime.base import ExecResult, VolumeMount


class EnvdUnavailable(Exception):
    pass


class EnvdLink:
    def __init__(self) -> None:
        # Sandbox addresses are on the host's own veths: no proxies from the environment apply. No
        # kept-alive connections: addresses are reused by later sandboxes, and a connection left over
        # from a dead one must not carry the next one's /init. A fresh local connection costs ~0.2 ms.
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0), trust_env=False,
                                         limits=httpx.Limits(max_keepalive_connections=0))

    async def close(self) -> None:
        await self._client.aclose()

    @staticmethod
    def _url(address: str, path: str) -> str:
        return f"http://{address}:{ENVD_PORT}{path}"

    # Generous: on a host saturated by many sandboxes (forks x100 on 2 cores) envd answers late, not never.
    async def wait_ready(self, address: str, timeout: float = 30.0) -> None:
        async def answers() -> bool:
            try:
                return (await self._client.get(self._url(address, "/health"), timeout=1.0)).status_code == 204
            except httpx.TransportError:
                return False

        await _poll(answers, timeout, f"envd at {address} did not answer /health within {timeout:.0f}s")

    async def wait_listening(self, address: str, timeout: float = 30.0) -> None:
        """Until envd's port accepts a connection. Enough after a restore from memory, where envd is the
        same process that answered before the checkpoint: its first HTTP request after a restore is slow
        (~30 ms while its memory is mapped back in), and the caller's own first request pays that anyway."""
        await _poll(lambda: port_accepts(address, ENVD_PORT), timeout,
                    f"envd at {address} did not accept a connection within {timeout:.0f}s")

    async def warm(self, address: str, user: str, command: str = "true") -> None:
        """Runs one login-shell command the way the SDK would, so the first command a user sends does not
        pay for faulting in envd's and bash's pages (and the command's) after a restore."""
        try:
            result = await self.run(address, None, ["/bin/bash", "-l", "-c", command], user=user, timeout=30.0)
        except EnvdUnavailable as e:
            raise EnvdUnavailable(f"envd at {address} failed the warm-up command: {e}") from e
        if result.exit_code != 0:
            raise EnvdUnavailable(f"envd at {address} failed the warm-up command: exit {result.exit_code}")

    async def run(self, address: str, token: str | None, argv: list[str], *, user: str = "root",
                  timeout: float = 30.0) -> ExecResult:
        """Runs a command through envd's Process/Start, as a process of the sandbox like the SDK's (unlike
        `runsc exec`, whose processes do not survive a checkpoint and restore), and waits for its end."""
        body = json.dumps({"process": {"cmd": argv[0], "args": argv[1:]}, "stdin": False}).encode()
        headers = {"Content-Type": "application/connect+json",
                   "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}
        if token:
            headers["X-Access-Token"] = token
        try:
            response = await self._client.post(self._url(address, "/process.Process/Start"), headers=headers,
                                               content=struct.pack(">BI", 0, len(body)) + body, timeout=timeout)
        except httpx.TransportError as e:
            raise EnvdUnavailable(f"envd at {address} is unreachable: {e!r}") from e
        if response.status_code != 200:
            raise EnvdUnavailable(f"envd refused the command: {response.status_code} {response.text[:200]}")
        out, err, exit_code = bytearray(), bytearray(), None
        for flags, message in connect_envelopes([response.content]):
            if flags & 0x02:
                if error := message.get("error"):
                    raise EnvdUnavailable(f"envd failed the command: {error.get('message')}")
                break
            event = message.get("event", {})
            if data := event.get("data"):
                out += base64.b64decode(data.get("stdout", ""))
                err += base64.b64decode(data.get("stderr", ""))
            elif (end := event.get("end")) is not None:
                exit_code = end.get("exitCode", 0) if end.get("exited", False) else 128 + 9
        if exit_code is None:
            raise EnvdUnavailable("envd's answer to the command had no end")
        return ExecResult(exit_code=exit_code, stdout=bytes(out), stderr=bytes(err))

    async def warm_service(self, address: str, port: int, path: str) -> None:
        """POSTs a template's warm-up request (`Recipe.warm_up`) to its service in the sandbox."""
        try:
            response = await self._client.post(f"http://{address}:{port}{path}", timeout=60.0)
        except httpx.TransportError as e:
            raise EnvdUnavailable(f"the service on port {port} at {address} failed its warm-up: {e}") from e
        if response.status_code >= 300:
            raise EnvdUnavailable(f"the service on port {port} at {address} failed its warm-up: "
                                  f"{response.status_code}")

    async def init(self, address: str, *, token: str, env_vars: dict[str, str], user: str | None = None,
                   workdir: str | None = None,
                   hostname: str | None = None, current_token: str | None = None,
                   trusted_certificates: str | None = None, volumes: tuple[VolumeMount, ...] = ()) -> None:
        """`volumes`: made visible to the sandbox by the runtime; envd mounts each at its path. `user` and
        `workdir`: None keeps what the template's envd was started with (its last USER and WORKDIR)."""
        body = {"accessToken": token, "envVars": env_vars, "timestamp": dt.datetime.now(dt.UTC).isoformat()}
        if user:
            body["defaultUser"] = user
        if workdir:
            body["defaultWorkdir"] = workdir
        if volumes:
            body["volumeMounts"] = [{"id": v.id, "path": v.path} for v in volumes]
        if hostname:
            body["hostname"] = hostname
        if trusted_certificates:
            body["caBundle"] = trusted_certificates
        headers = {"X-Access-Token": current_token} if current_token else {}
        deadline = asyncio.get_running_loop().time() + 30.0
        while True:
            try:
                response = await self._client.post(self._url(address, "/init"), json=body, headers=headers)
                break
            except httpx.TransportError as e:
                # A saturated host (many sandboxes on few cores) makes connects time out; /init is idempotent.
                if asyncio.get_running_loop().time() > deadline:
                    raise EnvdUnavailable(f"envd at {address} is unreachable: {e!r}") from e
                await asyncio.sleep(0.02)
        if response.status_code != 204:
            raise EnvdUnavailable(f"envd at {address} refused /init: {response.status_code} {response.text}")

    async def trust(self, address: str, token: str, pem: str) -> None:
        """Adds certificates to a running sandbox's trust store (/init with only its token and `caBundle`:
        nothing else of its state changes)."""
        try:
            response = await self._client.post(self._url(address, "/init"), headers={"X-Access-Token": token},
                                               json={"accessToken": token, "caBundle": pem})
        except httpx.TransportError as e:
            raise EnvdUnavailable(f"envd at {address} is unreachable: {e!r}") from e
        if response.status_code != 204:
            raise EnvdUnavailable(f"envd at {address} refused the certificates: {response.status_code}")

    async def download(self, address: str, token: str, path: str, destination, max_bytes: int) -> int:
        """Copies the file at `path` in the sandbox (read as root) to the host file `destination`, streamed;
        its size. EnvdUnavailable when envd refuses or the file is larger than `max_bytes`."""
        params = {"path": path, "username": "root"}
        try:
            async with self._client.stream("GET", self._url(address, "/files"), params=params,
                                           headers={"X-Access-Token": token}, timeout=60.0) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise EnvdUnavailable(f"envd refused the download: {response.status_code} {response.text}")
                size = 0
                with open(destination, "wb") as out:
                    async for chunk in response.aiter_bytes(1 << 20):
                        size += len(chunk)
                        if size > max_bytes:
                            raise EnvdUnavailable(f"the file is larger than {max_bytes} bytes")
                        out.write(chunk)
                return size
        except httpx.TransportError as e:
            raise EnvdUnavailable(f"envd at {address} is unreachable: {e!r}") from e

    async def metrics(self, address: str, token: str) -> dict:
        try:
            response = await self._client.get(self._url(address, "/metrics"), headers={"X-Access-Token": token},
                                              timeout=5.0)
        except httpx.TransportError as e:
            raise EnvdUnavailable(str(e)) from e
        if response.status_code != 200:
            raise EnvdUnavailable(f"/metrics answered {response.status_code}")
        return response.json()


async def _poll(ready: Callable[[], Awaitable[bool]], timeout: float, failure: str) -> None:
    """Tries `ready` every 20 ms until it says yes; EnvdUnavailable(failure) after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await ready():
        if asyncio.get_running_loop().time() > deadline:
            raise EnvdUnavailable(failure)
        await asyncio.sleep(0.02)
