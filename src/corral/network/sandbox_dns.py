"""The DNS server sandboxes use while `corral serve` serves public URLs: names under the public domain
resolve to the instance's service address, where the server listens for sandboxes' HTTPS; every other
question goes to the host's resolvers and their answer comes back unchanged.

Sandboxes query the fixed `dns_address` (169.254.53.53, in every template's resolv.conf); nftables
DNATs it to this server (network/firewall.py). Without a server (`corral sandbox run`) it is DNATed to the
host's resolver directly, and public names do not resolve inside sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("corral.dns")

TTL_S = 5  # a sandbox's public name answers the same for its whole life; short anyway
UPSTREAM_TIMEOUT_S = 3.0


class SandboxResolver:
    def __init__(self, domain: str, service_address: ipaddress.IPv4Address,
                 upstreams: list[ipaddress.IPv4Address], *, listen: ipaddress.IPv4Address, port: int = 53,
                 upstream_port: int = 53) -> None:
        self.domain = dns.name.from_text(domain)
        self.service_address = service_address
        self.upstreams = [str(u) for u in upstreams]
        self.listen, self.port, self.upstream_port = str(listen), port, upstream_port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.listen, self.port))
        self.port = self._udp.get_extra_info("sockname")[1]  # port 0 (tests): TCP takes the one UDP got
        self._tcp = await asyncio.start_server(self._serve_tcp, self.listen, self.port)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, wire: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to one query in wire format; None to drop it (unparseable)."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None
        if len(query.question) != 1:
            return _reply(query, dns.rcode.FORMERR)
        question = query.question[0]
        if question.name.is_subdomain(self.domain):
            return self._local(query, question)
        return await self._forward(query, wire, tcp=tcp)

    def _local(self, query: dns.message.Message, question: dns.rrset.RRset) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and question.rdclass == dns.rdataclass.IN:
            response.answer.append(dns.rrset.from_text(question.name, TTL_S, "IN", "A", str(self.service_address)))
        return response.to_wire()  # other types: the name exists, with no record of that type

    async def _forward(self, query: dns.message.Message, wire: bytes, *, tcp: bool) -> bytes:
        """The upstream's reply, byte for byte (EDNS, truncation and all), or SERVFAIL from us."""
        for upstream in self.upstreams:
            try:
                return await asyncio.wait_for((_ask_tcp if tcp else _ask_udp)(upstream, self.upstream_port, wire),
                                              UPSTREAM_TIMEOUT_S)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                log.debug("upstream %s failed for %s: %r", upstream, query.question[0].name, exc)
        return _reply(query, dns.rcode.SERVFAIL)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                (length,) = struct.unpack(">H", await reader.readexactly(2))
                reply = await self.answer(await reader.readexactly(length), tcp=True)
                if reply is None:
                    return
                writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: SandboxResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        async def reply() -> None:
            answer = await self.resolver.answer(data)
            if answer is not None and self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(answer, addr)

        self.resolver.spawn(reply())


async def _ask_udp(upstream: str, port: int, wire: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()
    query_id = wire[:2]

    class Exchange(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr) -> None:
            if data[:2] == query_id and not answered.done():
                answered.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not answered.done():
                answered.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Exchange, remote_addr=(upstream, port))
    try:
        transport.sendto(wire)
        return await answered
    finally:
        transport.close()


async def _ask_tcp(upstream: str, port: int, wire: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(upstream, port)
    try:
        writer.write(struct.pack(">H", len(wire)) + wire)
        await writer.drain()
        (length,) = struct.unpack(">H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()
