"""Corral's MCP tools over Streamable HTTP at `/mcp` on `corral serve` (docs/mcp.md). The caller's API key is
its bearer token; requests without a valid one are refused here, before the MCP SDK sees them. The tools act
with the key of each request through the REST API, so its team and scopes apply to every call."""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from mcp.server.transport_security import TransportSecuritySettings

from corral.mcp.server import bearer_key, build_server

PATH = "/mcp"


class KeyVerifier(Protocol):
    async def verify(self, secret: str | None) -> object | None: ...


class McpEndpoint:
    """An ASGI app for `PATH`: bearer authentication, then the MCP SDK's Streamable HTTP transport."""

    def __init__(self, keys: KeyVerifier, api_url: str, domain: str | None = None) -> None:
        """`api_url`: where the tools reach this server's API (its own listener)."""
        self.keys = keys
        self.server = build_server(api_url, None, domain)
        # Host checks guard unauthenticated local servers against DNS rebinding; this one is reached under
        # whatever names the operator serves, and a browser cannot send its bearer key.
        self.app = self.server.streamable_http_app(
            streamable_http_path=PATH,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        self._running: AbstractAsyncContextManager | None = None

    async def start(self) -> None:
        self._running = self.server.session_manager.run()
        await self._running.__aenter__()

    async def close(self) -> None:
        if self._running is not None:
            await self._running.__aexit__(None, None, None)
            self._running = None
        await self.server.clients.close()

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or ())
        secret = bearer_key(headers.get(b"authorization", b"").decode("latin-1"))
        if secret is None or await self.keys.verify(secret) is None:
            message = "Invalid API key" if secret else "Missing API key: send `Authorization: Bearer <key>`"
            body = json.dumps({"code": 401, "message": message}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b'Bearer realm="corral"')]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
