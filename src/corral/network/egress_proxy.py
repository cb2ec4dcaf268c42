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
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

log = logging.getLogger("corral.egress")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
FIRST_BYTES_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MAX_HEAD = 16384  # an HTTP request head or a TLS ClientHello larger than this is not looked into
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

    def domain_allowed(self, name: str) -> bool:
        name = name.rstrip(".").lower()
        for rule in self.domains:
            if rule == "*" or name == rule or (rule.startswith("*.") and name.endswith(rule[1:])):
                return True
        return False

    def address_allowed(self, address: ipaddress.IPv4Address) -> bool:
        if any(address in ipaddress.ip_network(c) for c in self.allow):
            return True
        if not self.internet:
            return False
        return not any(address in ipaddress.ip_network(c) for c in self.deny)


class EgressProxy:
    def __init__(self, policy_of: Callable[[str], EgressPolicy | None], resolvers: list[str], *,
                 listen: str, port: int, never: list[ipaddress.IPv4Network] | None = None,
                 resolver_port: int = 53) -> None:
        """`policy_of`: a sandbox address → its policy (None: not a sandbox, refused). `never`: address
        ranges never dialled besides the private ones (the sandboxes' own network)."""
        self._policy_of = policy_of
        self._never = [*NEVER, *(never or [])]
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = resolvers
        self._resolver.port = resolver_port
        self._resolver.lifetime = 5.0
        self.listen, self.port = listen, port
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
        self._tasks.add(task)
        upstream_writer = None
        try:
            sock = writer.get_extra_info("socket")
            source = writer.get_extra_info("peername")[0]
            destination, port = original_destination(sock)
            policy = self._policy_of(source)
            if policy is None:
                return
            head = await _first_bytes(reader, port)
            name = tls_server_name(head) if port == 443 else http_host(head)
            target = await self._decide(policy, name, destination, source)
            if target is None:
                log.info("egress of %s to %s (%s:%d) refused by its rules", source, name or "-", destination, port)
                return
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(str(target), port), CONNECT_TIMEOUT_S)
            upstream_writer.write(head)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            log.debug("egress connection ended: %r", exc)
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

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
        return any(address in network for network in self._never)

    async def _resolve(self, name: str) -> list[ipaddress.IPv4Address]:
        try:
            answer = await self._resolver.resolve(name, "A")
        except (dns.exception.DNSException, dns.resolver.NoAnswer):
            return []
        return [ipaddress.IPv4Address(r.address) for r in answer]


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


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
