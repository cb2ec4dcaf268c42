"""envd's HTTP surface: the two Connect services plus the plain endpoints, behind token auth."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from corral.envd import files, metrics
from corral.envd.filesystem_service import FilesystemService
from corral.envd.oom import OomGuard
from corral.envd.process_service import ProcessService
from corral.envd.processes import ProcessTable
from corral.envd.rpc import FILESYSTEM_METHODS, PROCESS_METHODS, ServiceApplication
from corral.envd.state import SandboxState
from corral.envd.sudo import SudoService
from corral.envd.users import UnknownUser, lookup
from corral.envd.volumes import VolumeMountError, mount_volumes

log = logging.getLogger("corral.envd")

# Paths reachable without X-Access-Token (/files checks token-or-signature itself, /init its own rule).
_OPEN = {("GET", "/health"), ("GET", "/files"), ("POST", "/files"), ("POST", "/init")}


class EnvdApp:
    def __init__(self, state: SandboxState | None = None, oom_guard: OomGuard | None = None) -> None:
        self.state = state or SandboxState()
        self._oom_guard = oom_guard
        self._oom_seen = 0  # the guard's kills before the last /init: a new identity starts from none
        self.processes = ProcessTable(lambda: self.state.env_vars)
        self.filesystem = FilesystemService(self.state)
        self._rpc = {
            "/process.Process/": ServiceApplication("process.Process", PROCESS_METHODS,
                                                    ProcessService(self.state, self.processes)),
            "/filesystem.Filesystem/": ServiceApplication("filesystem.Filesystem", FILESYSTEM_METHODS,
                                                          self.filesystem),
        }
        self._cpu = metrics.CpuSampler()
        plain = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/files", self.get_file, methods=["GET"]),
            Route("/files", self.post_file, methods=["POST"]),
            Route("/envs", self.envs, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/init", self.init, methods=["POST"]),
        ], lifespan=self._lifespan)
        self._plain = plain
        # envd answers browsers too (signed URLs, JS SDK in a page), as E2B's does.
        self._asgi = CORSMiddleware(self._dispatch, allow_origins=["*"], allow_methods=["*"],
                                    allow_headers=["*"], expose_headers=["*"])

    async def __call__(self, scope, receive, send) -> None:
        await self._asgi(scope, receive, send)

    async def _dispatch(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._plain(scope, receive, send)
            return
        path = scope["path"]
        if scope["type"] == "http" and (scope["method"], path) not in _OPEN:
            token = _header(scope, b"x-access-token")
            if not self.state.token_matches(token):
                await _unauthorized(scope, receive, send)
                return
        for prefix, app in self._rpc.items():
            if path.startswith(prefix):
                if (_header(scope, b"content-type") or "").startswith("application/grpc"):
                    # Only the Connect protocol is served (all E2B SDKs use it).
                    await JSONResponse({"code": "unimplemented", "message": "only the Connect protocol is "
                                        "served; gRPC and gRPC-Web are not"}, status_code=415)(scope, receive, send)
                    return
                await app(scope, receive, send)
                return
        await self._plain(scope, receive, send)

    async def health(self, request: Request) -> Response:
        return Response(status_code=204)

    async def get_file(self, request: Request) -> Response:
        return await files.download(request, self.state)

    async def post_file(self, request: Request) -> Response:
        return await files.upload(request, self.state)

    async def envs(self, request: Request) -> Response:
        return JSONResponse(self.state.env_vars)

    async def metrics(self, request: Request) -> Response:
        answer = metrics.snapshot(self._cpu)
        if self._oom_guard is not None:  # Corral's addition: what the OOM guard killed since the last /init
            kills = self._oom_guard.kills[self._oom_seen:]
            answer["oom_kills"] = len(kills)
            if kills:
                pid, resident_kib, command = kills[-1]
                answer["oom_last"] = {"pid": pid, "command": command, "rss_mib": resident_kib // 1024}
        return JSONResponse(answer)

    async def init(self, request: Request) -> Response:
        """The host's handover after every start or restore: identity, env vars, defaults."""
        if not self.state.token_matches(request.headers.get("x-access-token")):
            return JSONResponse({"code": 401, "message": files.UNAUTHORIZED}, status_code=401)
        try:
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            env_vars = body.get("envVars")
            if env_vars is not None and not (isinstance(env_vars, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())):
                raise ValueError("envVars must map strings to strings")
            user = body.get("defaultUser")
            if user is not None:
                lookup(user)
            trusted = body.get("caBundle")
            if trusted is not None and not (isinstance(trusted, str) and "BEGIN CERTIFICATE" in trusted):
                raise ValueError("caBundle must be PEM certificates")
        except (ValueError, UnknownUser) as e:
            message = f"unknown user {e}" if isinstance(e, UnknownUser) else str(e)
            return JSONResponse({"code": 400, "message": message}, status_code=400)
        if env_vars is not None:
            self.state.env_vars = dict(env_vars)
        if "accessToken" in body:
            self.state.access_token = body["accessToken"] or None
        if user is not None and user != self.state.default_user:
            self.state.default_user = user
            with contextlib.suppress(UnknownUser, OSError):
                self.processes.prepare_user(lookup(user))
        if body.get("defaultWorkdir"):
            self.state.default_workdir = body["defaultWorkdir"]
        if self._oom_guard is not None:
            self._oom_seen = len(self._oom_guard.kills)
        if isinstance(body.get("hostname"), str) and body["hostname"]:
            # Corral's extension: a sandbox restored from a snapshot would keep the snapshot's hostname.
            try:
                socket.sethostname(body["hostname"])
            except OSError as e:
                log.warning("cannot set the hostname: %s", e)
        if trusted:
            _trust(trusted)
        if body.get("volumeMounts"):
            try:
                mount_volumes(body["volumeMounts"])
            except VolumeMountError as e:
                return JSONResponse({"code": 400, "message": str(e)}, status_code=400)
        if isinstance(body.get("timestamp"), str):
            _note_clock(body["timestamp"])
        return Response(status_code=204)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        with contextlib.suppress(UnknownUser, OSError):
            # Started before the template's snapshot is taken, so restored sandboxes have it running.
            self.processes.prepare_user(lookup(self.state.default_user))
        sudo = None
        if os.geteuid() == 0:
            sudo = SudoService(self.processes.spawners)
            try:
                sudo.start()
            except OSError as e:  # another envd in this sandbox serves it already
                log.warning("sudo service not started: %s", e)
                sudo = None
        _release_startup_memory()
        yield
        if sudo is not None:
            sudo.close()
        self.filesystem.close()
        self.processes.kill_all()


def _release_startup_memory() -> None:
    """Give back what importing and wiring left on the heap; envd's idle footprint counts against
    every sandbox's memory."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _unauthorized(scope, receive, send) -> None:
    response = JSONResponse({"code": 401, "message": files.UNAUTHORIZED}, status_code=401)
    await response(scope, receive, send)


def _note_clock(timestamp: str) -> None:
    """The sandbox's clock comes from the host kernel (gVisor reads it through the vDSO), so there is
    nothing to set; a large skew would mean a broken host and is worth a log line."""
    from datetime import datetime

    try:
        sent = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return
    if abs(sent - time.time()) > 5:
        log.warning("clock differs from the host's by %.1f s", sent - time.time())


# The system's CA bundle (Debian's ca-certificates), which curl, wget, apt, OpenSSL and Python's ssl defaults
# read, and where `update-ca-certificates` puts local CAs so that they survive it running again.
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_CA = Path("/usr/local/share/ca-certificates/corral-ingress.crt")


def _trust(pem: str) -> None:
    """/init's `caBundle`: certificates the sandbox's clients trust from now on (Corral sends the CA of the
    host's public URLs, so a sandbox can open other sandboxes' https URLs). Idempotent."""
    try:
        LOCAL_CA.parent.mkdir(parents=True, exist_ok=True)
        LOCAL_CA.write_text(pem)
        bundle = SYSTEM_BUNDLE.read_text() if SYSTEM_BUNDLE.exists() else ""
        if pem.strip() not in bundle:
            with SYSTEM_BUNDLE.open("a") as f:
                f.write(("" if not bundle or bundle.endswith("\n") else "\n") + pem.strip() + "\n")
    except OSError as e:
        log.warning("cannot add the host's CA to the trust store: %s", e)
