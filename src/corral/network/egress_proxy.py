"""Egress rules by domain: a transparent proxy on the host for sandboxes that have them.

nftables sends such a sandbox's new TCP connections to ports 80 and 443 here (DNAT to the instance's
service address, network/firewall.py); the original destination comes back through SO_ORIGINAL_DST. The
proxy reads the name the sandbox asks for, the HTTP `Host` on port 80 and the TLS SNI on 443 (from the
ClientHello, without decrypting anything), and:

- a name allowed by the sandbox's domain rules (`example.com` exact, `*.example.com` any depth below but
  not the apex, `*` any): the proxy resolves the name itself through the host's resolvers and connects
  there, never to a private, loopback, link-local or sandbox address, whatever the name resolves to (no
  DNS rebinding into the host's network), nor to the address the sandbox dialled;
- otherwise the address rules decide, as for any other port: allowed address → through, internet off or
  denied address → refused, else through.

A refused connection is closed without a byte. Bytes are relayed both ways untouched."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

from corral.proxy.tls import EgressCA

log = logging.getLogger("corral.egress")

SECRET_PLACEHOLDER = re.compile(r"\$\{e2b\.secrets\.([A-Za-z0-9_-]{1,128})\}")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
FIRST_BYTES_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MAX_HEAD = 16384
SETUP_TIMEOUT_S = 15.0  # from accept until the request is on its way: a slow sandbox holds nothing longer
IDLE_TIMEOUT_S = 900.0  # a relayed connection with no byte either way for this long is closed
MAX_PER_SANDBOX, MAX_CONNECTIONS = 256, 4096
_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NEVER_METHODS = {"TRACE", "TRACK", "CONNECT"}  # TRACE would echo the secret back into the sandbox
_OVERRIDES = {"x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"}
DNS_CACHE_MAX_S = 60
DNS_CACHE_ENTRIES = 4096  # an HTTP request head or a TLS ClientHello larger than this is not looked into
NEVER = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3")]


@dataclass(frozen=True)
class EgressPolicy:
    """What one sandbox may reach (its runtime config's egress fields)."""

    internet: bool
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    domains: tuple[str, ...]
    rules: dict[str, dict] = field(default_factory=dict)  # host pattern -> {headers, methods, pathPrefixes}

    def domain_allowed(self, name: str) -> bool:
        return any(_matches(rule, name) for rule in self.domains)

    def rule_for(self, name: str) -> dict | None:
        """The rule for `name`: an exact pattern wins over the longest matching wildcard."""
        name = name.rstrip(".").lower()
        if name in self.rules:
            return self.rules[name]
        wildcards = [p for p in self.rules if p.startswith("*.") and _matches(p, name)]
        return self.rules[max(wildcards, key=len)] if wildcards else None

    def address_allowed(self, address: ipaddress.IPv4Address) -> bool:
        if any(address in ipaddress.ip_network(c) for c in self.allow):
            return True
        if not self.internet:
            return False
        return not any(address in ipaddress.ip_network(c) for c in self.deny)


class EgressProxy:
    def __init__(self, policy_of: Callable[[str], EgressPolicy | None], resolvers: list[str], *,
                 listen: str, port: int, never: list[ipaddress.IPv4Network] | None = None,
                 resolver_port: int = 53, ca: EgressCA | None = None,
                 secret: Callable[[str, str], Awaitable[str | None]] | None = None,
                 upstream_tls: ssl.SSLContext | None = None) -> None:
        """`policy_of`: a sandbox address → its policy (None: not a sandbox, refused). `never`: address
        ranges never dialled besides the private ones (the sandboxes' own network). For header rules: `ca`
        signs the certificates shown to sandboxes, `secret` gives a secret's value for (sandbox address,
        secret name), `upstream_tls` verifies the real servers (the system's CAs by default)."""
        self._policy_of = policy_of
        self._ca = ca
        self._secret = secret
        self._upstream_tls = upstream_tls or ssl.create_default_context()
        self._never = [*NEVER, *(never or [])]
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = resolvers
        self._resolver.port = resolver_port
        self._resolver.lifetime = 5.0
        self.listen, self.port = listen, port
        self._cache: dict[str, tuple[list[ipaddress.IPv4Address], float]] = {}  # name -> (addresses, until)
        self._local = _local_addresses()  # the host's own: never dialled for a sandbox, as the firewall says
        self._open: dict[str, int] = {}  # connections per sandbox address
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.listen, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        source = writer.get_extra_info("peername")[0]
        if self._open.get(source, 0) >= MAX_PER_SANDBOX or len(self._tasks) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._tasks.add(task)
        self._open[source] = self._open.get(source, 0) + 1
        upstream_writer = None
        try:
            sock = writer.get_extra_info("socket")
            destination, port = original_destination(sock)
            policy = self._policy_of(source)
            if policy is None:
                return
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                head = await _first_bytes(reader, port)
                name = valid_name(tls_server_name(head) if port == 443 else http_host(head))
                rule = policy.rule_for(name) if name else None
                if rule is not None:  # the rule's request goes to the name, wherever the sandbox dialled
                    target = await self._decide_named(policy, name)
                else:
                    target = await self._decide(policy, name, destination, source)
            if target is None:
                log.info("egress of %s to %s (%s:%d) refused by its rules", source, name or "-", destination, port)
                return
            if rule is not None:
                await self._rewrite(reader, writer, head, port, name, target, rule, source)
                return
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(str(target), port), CONNECT_TIMEOUT_S)
            upstream_writer.write(head)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, ssl.SSLError) as exc:
            log.debug("egress connection ended: %r", exc)
        finally:
            self._tasks.discard(task)
            self._open[source] -= 1
            if not self._open[source]:
                del self._open[source]
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

    async def _rewrite(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, port: int,
                       name: str, target: ipaddress.IPv4Address, rule: dict, source: str) -> None:
        """One request with the rule's headers set, to the real server (verified), its answer back. HTTPS
        is terminated with a certificate for `name` from the egress CA, which only sandboxes trust; the
        upstream connection says `Connection: close`, so each request has a connection of its own. The
        upstream connection (and its TLS handshake) is made while the sandbox's handshake and request
        arrive: the two handshakes overlap instead of adding up."""
        if port == 443 and self._ca is None:
            return
        upstream = asyncio.ensure_future(asyncio.wait_for(asyncio.open_connection(
            str(target), port, ssl=self._upstream_tls if port == 443 else None,
            server_hostname=name if port == 443 else None), CONNECT_TIMEOUT_S))
        try:
            await self._rewrite_with(reader, writer, head, port, name, rule, source, upstream)
        finally:
            if not upstream.done():
                upstream.cancel()
            with contextlib.suppress(BaseException):
                _, upstream_writer = await upstream
                upstream_writer.close()

    async def _rewrite_with(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
                            port: int, name: str, rule: dict, source: str, upstream: asyncio.Future) -> None:
        async with asyncio.timeout(SETUP_TIMEOUT_S):  # a sandbox that stalls its handshake holds nothing
            if port == 443:
                client: _Plain | _TLSServer = _TLSServer(reader, writer, self._ca.context_for(name), head)
                await client.handshake()
                data = b""
            else:
                client, data = _Plain(reader, writer), head
            while b"\r\n\r\n" not in data:
                chunk = await client.read()
                if not chunk or len(data) > MAX_HEAD:
                    return
                data += chunk
        request, _, rest = data.partition(b"\r\n\r\n")
        if problem := malformed_head(request):
            await client.write(_answer(400, f"egress rule for {name}: {problem}"))
            return
        method, _, target_path = request.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        method = method.upper()
        path, _, version = target_path.rpartition(" ")
        if refusal := _out_of_scope(rule, name, method, path):
            await client.write(_answer(403, refusal))
            return
        values: dict[str, tuple[str, str]] = {}
        for header, template in (rule.get("headers") or {}).items():
            value = template
            for secret_name in set(SECRET_PLACEHOLDER.findall(template)):
                secret = await self._secret(source, secret_name) if self._secret is not None else None
                if secret is None or not _HEADER_VALUE.match(secret):
                    why = "not found" if secret is None else "not a valid header value"
                    await client.write(_answer(502, f"egress rule for {name}: secret {secret_name!r} {why}"))
                    return
                value = value.replace("${e2b.secrets." + secret_name + "}", secret)
            values[header.lower()] = (header, value)
        # The request goes to `name` and says so: a Host (or an absolute request target) naming another site
        # would let a server or CDN hosting both route the rule's headers, secrets included, to that site.
        origin_form = path if path.startswith("/") else _origin_form(path)
        request_line = f"{method} {origin_form} {version}".encode("latin-1")
        lines = request.split(b"\r\n")
        dropped = {*values, "host", "connection", "proxy-connection", "keep-alive"}
        if rule.get("methods") or rule.get("pathPrefixes"):
            dropped |= _OVERRIDES  # they would make a server treat the request as another one
        kept = [line for line in lines[1:] if line.partition(b":")[0].strip().lower().decode("latin-1")
                not in dropped]
        rewritten = b"\r\n".join([request_line, f"Host: {name}".encode("latin-1"), *kept,
                                   *(f"{h}: {v}".encode("latin-1") for h, v in values.values()),
                                   b"Connection: close"]) + b"\r\n\r\n"
        upstream_reader, upstream_writer = await upstream
        upstream_writer.write(rewritten + rest)
        to_server = asyncio.ensure_future(_pump(client.read, upstream_writer))
        try:
            while chunk := await asyncio.wait_for(upstream_reader.read(65536), IDLE_TIMEOUT_S):
                await client.write(chunk)
        finally:
            to_server.cancel()

    async def _decide_named(self, policy: EgressPolicy, name: str) -> ipaddress.IPv4Address | None:
        """Where a request under a header rule goes: `name` where the proxy resolves it (never where the
        sandbox dialled), if the rules let the sandbox reach it there."""
        for address in await self._resolve(name):
            if not self._forbidden(address) and (policy.domain_allowed(name) or policy.address_allowed(address)):
                return address
        return None

    async def _decide(self, policy: EgressPolicy, name: str | None, destination: ipaddress.IPv4Address,
                      source: str) -> ipaddress.IPv4Address | None:
        if name and policy.domain_allowed(name):
            for address in await self._resolve(name):
                if not self._forbidden(address):
                    return address
            return None
        if self._forbidden(destination) or not policy.address_allowed(destination):
            return None
        return destination

    def _forbidden(self, address: ipaddress.IPv4Address) -> bool:
        return address in self._local or any(address in network for network in self._never)

    async def _resolve(self, name: str) -> list[ipaddress.IPv4Address]:
        """The name's addresses, cached for their TTL (at most DNS_CACHE_MAX_S): a sandbox calling an API
        opens a connection per request, and each would otherwise wait for a lookup."""
        name = name.rstrip(".").lower()
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            answer = await self._resolver.resolve(name, "A")
        except (dns.exception.DNSException, dns.resolver.NoAnswer):
            return []
        addresses = [ipaddress.IPv4Address(r.address) for r in answer]
        ttl = min(max(answer.rrset.ttl if answer.rrset is not None else 0, 0), DNS_CACHE_MAX_S)
        if ttl:
            if len(self._cache) >= DNS_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[name] = (addresses, now + ttl)
        return addresses


def _matches(rule: str, name: str) -> bool:
    name = name.rstrip(".").lower()
    return rule == "*" or name == rule or (rule.startswith("*.") and name.endswith(rule[1:]))


def original_destination(sock: socket.socket) -> tuple[ipaddress.IPv4Address, int]:
    """Where the sandbox connected before nftables sent the connection here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return ipaddress.IPv4Address(packed), port


async def _first_bytes(reader: asyncio.StreamReader, port: int) -> bytes:
    """Enough of what the client sends first to name its destination: an HTTP request head, or a TLS
    record holding the ClientHello."""
    data = b""
    while len(data) < MAX_HEAD:
        chunk = await asyncio.wait_for(reader.read(MAX_HEAD - len(data)), FIRST_BYTES_TIMEOUT_S)
        if not chunk:
            break
        data += chunk
        if port == 443 and len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"):
            break
        if port != 443 and b"\r\n\r\n" in data:
            break
    return data


def http_host(head: bytes) -> str | None:
    """The Host of an HTTP/1 request head (without its port), or None."""
    for line in head.split(b"\r\n")[1:]:
        if not line:
            break
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            if host.startswith("["):
                return None
            return host.rsplit(":", 1)[0] if ":" in host else host
    return None


def tls_server_name(record: bytes) -> str | None:
    """The server_name of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), or None."""
    try:
        if record[0] != 0x16 or record[5] != 0x01:  # handshake record, ClientHello
            return None
        body = record[9:]
        pos = 2 + 32  # client_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos:pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind, size = int.from_bytes(body[pos:pos + 2], "big"), int.from_bytes(body[pos + 2:pos + 4], "big")
            if kind == 0:  # server_name: list length, then (type 0 = host_name, length, name)
                entry = body[pos + 4:pos + 4 + size]
                if entry[2] == 0:
                    length = int.from_bytes(entry[3:5], "big")
                    return entry[5:5 + length].decode("ascii")
            pos += 4 + size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def _origin_form(target: str) -> str:
    """`http://host/a?b` → `/a?b` (the absolute form a proxy-aware client may send)."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        return "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    return "/"


def _out_of_scope(rule: dict, name: str, method: str, path: str) -> str | None:
    """Why the request may not go under this rule (None: it may)."""
    if method.upper() in _NEVER_METHODS:
        return f"egress rule for {name}: {method.upper()} is never forwarded with a rule's headers"
    if rule.get("methods") and method.upper() not in rule["methods"]:
        return f"egress rule for {name} allows only {', '.join(rule['methods'])}, not {method}"
    path = path.split("?", 1)[0]
    if path.startswith(("http://", "https://")):  # absolute form
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    prefixes = rule.get("pathPrefixes") or []
    if prefixes:
        # What a server might read differently from the proxy is refused rather than interpreted.
        if _AMBIGUOUS_PATH.search(path):
            return f"egress rule for {name}: the path {path} has dot segments, encoded separators or backslashes"
        if not any(path == p or path.startswith(p if p.endswith("/") else p + "/") for p in prefixes):
            return f"egress rule for {name} allows only paths under {', '.join(prefixes)}, not {path}"
    return None


_AMBIGUOUS_PATH = re.compile(r"(^|/)\.\.?(/|$)|%2[eEfF]|%5[cC]|\\")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")


def malformed_head(head: bytes) -> str | None:
    """Why an HTTP/1 request head cannot be rewritten safely (None: it can). Strict where servers are
    lenient: a line break other than CRLF, a control character, a folded line, a header name that is
    not a token, or framing given twice could make a server see a second request the proxy never saw."""
    if re.search(rb"(?<!\r)\n|\r(?!\n)", head):
        return "line breaks must be CRLF"
    if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", head.replace(b"\r\n", b"")):
        return "control characters in the request head"
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return "a malformed request line"
    lengths = transfer = 0
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            return "folded header lines"
        name, colon, _ = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            return "a malformed header line"
        lengths += name.lower() == b"content-length"
        transfer += name.lower() == b"transfer-encoding"
    if lengths > 1 or (lengths and transfer) or transfer > 1:
        return "the body's length given more than once"
    return None


def valid_name(name: str | None) -> str | None:
    """A DNS name as a host name may be (lower case, LDH labels), else None: whatever else a sandbox puts in
    its SNI or Host is treated as no name at all."""
    if not name:
        return None
    name = name.rstrip(".").lower()
    return name if _NAME.match(name) else None


def _local_addresses() -> set[ipaddress.IPv4Address]:
    """The host's own IPv4 addresses."""
    import json
    import subprocess

    try:
        out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
        return {ipaddress.IPv4Address(a["local"]) for iface in json.loads(out) for a in iface.get("addr_info", [])}
    except (OSError, ValueError, subprocess.SubprocessError):
        return set()


def _answer(status: int, message: str) -> bytes:
    body = (message + "\n").encode()
    reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def _pump(read: Callable[[], Awaitable[bytes]], writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError, TimeoutError):
        while chunk := await asyncio.wait_for(read(), IDLE_TIMEOUT_S):
            writer.write(chunk)
            await writer.drain()


class _Plain:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(65536)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class _TLSServer:
    """The server side of TLS over a stream whose first bytes (the ClientHello) were already read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext,
                 first: bytes) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.incoming.write(first)

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the sandbox left during the TLS handshake") from None
        await self._flush()

    async def read(self) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLError:  # closed (close_notify, or a cut connection)
                return b""

    async def write(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT_S):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
