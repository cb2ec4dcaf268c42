"""Forwards SDK traffic to `port` inside sandbox `id`: streamed both ways (chunked uploads, server
streams, NDJSON), long-lived, WebSockets included, with the 502 messages the SDKs recognise. When a sandbox
goes away, what is in flight to it ends at once, the way the SDKs read as "the sandbox died"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from html import escape

import aiohttp
import websockets
from multidict import CIMultiDict
from yarl import URL

from corral.control.network import TRAFFIC_TOKEN_HEADER, Ingress
from corral.envd import DEFAULT_PORT as ENVD_PORT

NOT_FOUND = "The sandbox was not found"
PORT_CLOSED = "The sandbox is running but port is not open"
# Neither of the above: the SDKs then probe the sandbox to learn whether it is gone or was only checkpointed.
CUT_SHORT = "The sandbox went away (killed, paused or checkpointed) while the request was in flight"
# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the routing headers.
_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"host", b"e2b-sandbox-id", b"e2b-sandbox-port"}
_HOST_ROUTE = re.compile(r"^(?P<port>\d{1,5})-(?P<sandbox>[a-z0-9]+)\.")

log = logging.getLogger("corral.proxy")
# Set in the task of a response `_end_cut_short` left unfinished on purpose (see `_QuietCutShort`).
_cut_short_here: ContextVar[bool] = ContextVar("cut_short_here", default=False)


class _QuietCutShort(logging.Filter):
    """uvicorn logs an ERROR for every response an app leaves unfinished; for one the proxy cut short on
    purpose its own INFO line (in `forget`) already says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_cut_short_here.get() and record.getMessage().startswith("ASGI callable returned without"))


def route_from_host(host: str, domain: str) -> tuple[str, int] | None:
    """`<port>-<sandboxID>.<domain>` → (sandbox id, port)."""
    host = host.split(":")[0].lower()
    if not host.endswith("." + domain.lower()):
        return None
    match = _HOST_ROUTE.match(host)
    if match is None or match.end() != len(host) - len(domain):
        return None
    return match["sandbox"], int(match["port"])


class ProxyTraffic:
    """What the proxy forwarded, read by /metrics at scrape time: plain integers, since the proxy runs on
    one event loop (no locks) and per-request labels would only multiply series."""

    __slots__ = ("bytes_in", "bytes_out", "responses")

    def __init__(self) -> None:
        self.responses = [0] * 6  # by status class: [1] 1xx (WebSockets accepted) ... [5] 5xx
        self.bytes_in = 0  # request bodies and WebSocket messages from clients to sandboxes
        self.bytes_out = 0  # response bodies and WebSocket messages from sandboxes to clients

    def answered(self, status: int) -> None:
        self.responses[min(max(status // 100, 1), 5)] += 1


class SandboxProxy:
    def __init__(self, resolve: Callable[[str], Awaitable[str | None]],
                 ingress: Callable[[str], Awaitable[Ingress | None]] | None = None) -> None:
        """`resolve`: a sandbox's address (None: there is none running, even after an automatic resume);
        `ingress`: its ingress options (traffic token, Host masking, HTTPS ports), checked first."""
        self._resolve = resolve
        self._ingress = ingress
        # One connection pool per sandbox: addresses are reused by later sandboxes, and a kept-alive
        # connection to a dead sandbox must never carry a request meant for its successor.
        self._clients: dict[str, aiohttp.ClientSession] = {}
        # The tasks forwarding each sandbox's requests, so `forget` can end them; `_cut` holds the ones it
        # cancelled (to tell its cancellation from a server shutdown's).
        self._exchanges: dict[str, set[asyncio.Task]] = {}
        self._cut: set[asyncio.Task] = set()
        self.traffic = ProxyTraffic()
        logging.getLogger("uvicorn.error").addFilter(_QuietCutShort())

    def _client(self, sandbox_id: str) -> aiohttp.ClientSession:
        client = self._clients.get(sandbox_id)
        if client is None:
            # No overall timeout: commands and watches stream for hours. Connect failures are quick.
            # aiohttp parses responses in C, which keeps the proxy's cost per request low.
            client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0), auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                trust_env=False)
            self._clients[sandbox_id] = client
        return client

    async def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone (or is about to be checkpointed): end its in-flight requests and drop its
        connections."""
        exchanges = self._exchanges.pop(sandbox_id, set())
        for exchange in exchanges:
            self._cut.add(exchange)
            exchange.cancel()
        if exchanges:
            log.info("sandbox %s went away: ended %d request(s) in flight to it", sandbox_id, len(exchanges))
        client = self._clients.pop(sandbox_id, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        for sandbox_id in list(self._clients):
            await self.forget(sandbox_id)

    async def __call__(self, scope, receive, send, sandbox_id: str, port: int) -> None:
        response = _ResponseProgress(send, self.traffic)
        send = response.send
        rules = await self._ingress(sandbox_id) if self._ingress is not None else None
        if rules is not None:
            # Before the address: a request without the token must not wake (auto-resume) the sandbox.
            refusal = rules.token_refusal(port, _header(scope, TRAFFIC_TOKEN_HEADER.encode()))
            if refusal is not None:
                await _refuse(scope, receive, send, sandbox_id, refusal, 403)
                return
        scope = {**scope, "corral.ingress": rules or Ingress()}
        address = await self._resolve(sandbox_id)
        if address is None:  # nothing can be in flight to it: answered at once
            await self._forward(scope, receive, send, sandbox_id, address, port)
            return
        # Only what reached the sandbox is ended by `forget`; a request waiting in `_resolve` (for a
        # checkpoint to finish, or an automatic resume) goes on when it is done.
        exchange = asyncio.current_task()
        exchanges = self._exchanges.setdefault(sandbox_id, set())
        exchanges.add(exchange)
        try:
            await self._forward(scope, receive, send, sandbox_id, address, port)
        except asyncio.CancelledError:
            if exchange not in self._cut or exchange.uncancel() > 0:
                raise  # not (only) `forget`: e.g. the server is shutting down
            await _end_cut_short(scope, response, sandbox_id)
        finally:
            self._cut.discard(exchange)
            exchanges.discard(exchange)
            if not exchanges and self._exchanges.get(sandbox_id) is exchanges:
                del self._exchanges[sandbox_id]

    async def _forward(self, scope, receive, send, sandbox_id: str, address: str | None, port: int) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, sandbox_id, address, port)
            return
        if address is None:
            await self.forget(sandbox_id)
            await _error(send, sandbox_id, NOT_FOUND, html=_wants_html(scope))
            return
        if port == ENVD_PORT and scope["path"].rstrip("/") == "/init":
            # The host hands out identities through /init; nobody outside may.
            await _error(send, sandbox_id, "envd's /init is not reachable through the proxy", status=403)
            return
        rules: Ingress = scope["corral.ingress"]
        scheme = "https" if port in rules.https_ports else "http"
        target = f"{scheme}://{address}:{port}{scope.get('raw_path', scope['path'].encode()).decode('latin-1')}"
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                              if k not in _HOP)
        if (masked := rules.host_for(port)) is not None:
            headers["Host"] = masked
            if (original := _header(scope, b"host")) is not None:
                headers["X-Forwarded-Host"] = original
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        client = self._client(sandbox_id)
        body_read = asyncio.Event()
        if not has_body:
            body_read.set()
        try:
            # A service inside that speaks HTTPS (`httpsPorts`) has whatever certificate it made itself.
            upstream = await client.request(scope["method"], URL(target, encoded=True), headers=headers,
                                            data=_body(receive, body_read, self.traffic) if has_body else None,
                                            allow_redirects=False, ssl=scheme != "https")
        except aiohttp.ClientConnectorError:
            await _error(send, sandbox_id, PORT_CLOSED, html=_wants_html(scope))
            return
        except (aiohttp.ClientError, OSError) as e:
            await _error(send, sandbox_id, f"The sandbox did not answer: {e!r}", html=_wants_html(scope))
            return
        client_left = asyncio.create_task(_close_when_client_leaves(receive, body_read, upstream))
        try:
            out_headers = [(k, v) for k, v in upstream.raw_headers if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": upstream.status, "headers": out_headers})
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (aiohttp.ClientError, OSError):
            # The sandbox went away mid-response, or the client did: drop the upstream connection (so
            # the sandbox sees the client leave) and end what we can.
            upstream.close()
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            client_left.cancel()
            upstream.release()

    async def _websocket(self, scope, receive, send, sandbox_id: str, address: str | None, port: int) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if address is None:
            await send({"type": "websocket.close", "code": 4404, "reason": NOT_FOUND})
            return
        tls = port in scope["corral.ingress"].https_ports
        target = f"{'wss' if tls else 'ws'}://{address}:{port}{scope['path']}"
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k not in _HOP and not k.startswith(b"sec-websocket")]
        try:
            upstream = await websockets.connect(target, additional_headers=headers,
                                                subprotocols=scope.get("subprotocols") or None,
                                                open_timeout=5, max_size=None, ssl=_UNVERIFIED if tls else None)
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError):
            await send({"type": "websocket.close", "code": 1011, "reason": PORT_CLOSED})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def client_to_sandbox() -> None:
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    await upstream.close()
                    return
                data = event.get("bytes") if event.get("bytes") is not None else event.get("text")
                self.traffic.bytes_in += len(data or b"")
                await upstream.send(data)

        async def sandbox_to_client() -> None:
            try:
                async for data in upstream:
                    key = "bytes" if isinstance(data, bytes) else "text"
                    await send({"type": "websocket.send", key: data})
            finally:
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": upstream.close_code or 1000})

        tasks = [asyncio.create_task(client_to_sandbox()), asyncio.create_task(sandbox_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()


class _ResponseProgress:
    """Wraps an ASGI `send` to remember whether the response (or WebSocket) has started, and counts what
    is sent in `traffic`."""

    __slots__ = ("_send", "_traffic", "started")

    def __init__(self, send, traffic: ProxyTraffic) -> None:
        self._send = send
        self._traffic = traffic
        self.started = False

    async def send(self, message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self._traffic.bytes_out += len(message.get("body", b""))
        elif kind == "websocket.send":
            self._traffic.bytes_out += len(message.get("bytes") or message.get("text") or b"")
        elif kind in ("http.response.start", "websocket.http.response.start"):
            self.started = True
            self._traffic.answered(message["status"])
        elif kind in ("websocket.accept", "websocket.close"):
            if not self.started:  # a close before the accept refuses the handshake (403)
                self._traffic.answered(101 if kind == "websocket.accept" else 403)
            self.started = True
        await self._send(message)


async def _end_cut_short(scope, response: _ResponseProgress, sandbox_id: str) -> None:
    """Ends a request whose sandbox went away while it was forwarded."""
    if response.started:
        # Returning without the final body makes the server drop the connection: the SDKs take a broken
        # stream, not a clean end, as the sandbox dying mid-request; they then probe it (GET /health),
        # get NOT_FOUND and raise their "sandbox was killed" error. A clean end would read as a complete
        # (truncated) result. A WebSocket was closed by `_websocket`'s own cleanup.
        _cut_short_here.set(True)
        return
    # Not answered yet: the sandbox may only be checkpointed, so not NOT_FOUND (see CUT_SHORT).
    if scope["type"] == "websocket":
        await response.send({"type": "websocket.close", "code": 1011, "reason": CUT_SHORT})
    else:
        await _error(response.send, sandbox_id, CUT_SHORT)


async def _body(receive, read: asyncio.Event, traffic: ProxyTraffic) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if chunk := message.get("body", b""):
            traffic.bytes_in += len(chunk)
            yield chunk
        if not message.get("more_body", False):
            read.set()
            return


async def _close_when_client_leaves(receive, body_read: asyncio.Event, upstream: aiohttp.ClientResponse) -> None:
    """A client that leaves mid-response (a timeout, a closed connection) is seen on `receive` once the
    request body is read (before, the body's reader owns it). The server does not tell the response's
    writer: its writes just go nowhere. Closing the sandbox's connection passes the news on, so that the
    service in the sandbox stops work nobody waits for (the code interpreter interrupts the execution)."""
    await body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass
    if not upstream.content.at_eof():  # a complete response's connection goes back to the pool
        upstream.close()


async def _error(send, sandbox_id: str, message: str, status: int = 502, *, html: bool = False) -> None:
    """E2B's JSON error, or for a browser (which would show JSON as text) a small page saying the same."""
    if html:
        body = _ERROR_PAGE.format(status=status, message=escape(message), sandbox=escape(sandbox_id)).encode()
        kind = b"text/html; charset=utf-8"
    else:
        body = json.dumps({"sandboxId": sandbox_id, "message": message, "code": status}).encode()
        kind = b"application/json"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _refuse(scope, receive, send, sandbox_id: str, message: str, status: int) -> None:
    """Answers a request the proxy does not forward (a WebSocket handshake is refused with `status`)."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "websocket.http.response.body",
                    "body": json.dumps({"sandboxId": sandbox_id, "message": message, "code": status}).encode()})
        return
    await _error(send, sandbox_id, message, status, html=_wants_html(scope))


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _wants_html(scope) -> bool:
    """A browser navigating (it asks for HTML); API clients and the SDKs never do."""
    accept = _header(scope, b"accept") or ""
    return "text/html" in accept


_UNVERIFIED = ssl.create_default_context()
_UNVERIFIED.check_hostname = False
_UNVERIFIED.verify_mode = ssl.CERT_NONE

_ERROR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{status} · Corral</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36rem;margin:15vh auto;padding:0 1rem;color:#222}}
h1{{font-size:1.3rem}} code{{background:#f2f2f2;padding:.1rem .3rem;border-radius:3px}}</style></head>
<body><h1>{message}</h1><p>Sandbox <code>{sandbox}</code> · HTTP {status}</p></body></html>
"""
