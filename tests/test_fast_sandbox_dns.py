"""The DNS server sandboxes use while public URLs are served (corral.network.sandbox_dns): real UDP and
TCP on loopback, with a stand-in upstream resolver; no root needed."""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from corral.network.sandbox_dns import SandboxResolver

SERVICE = ipaddress.IPv4Address("169.254.54.9")
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


class Upstream(asyncio.DatagramProtocol):
    """Answers every A question with 192.0.2.7 and counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        self.asked.append(query.question[0].name.to_text())
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.7"))
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture()
def run():
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


async def resolver_with_upstream(up: bool = True) -> tuple[SandboxResolver, Upstream]:
    upstream = Upstream()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: upstream,
                                                                             local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    if not up:
        transport.close()
    resolver = SandboxResolver("corral.localhost", SERVICE, [LOOPBACK], listen=LOOPBACK, port=0, upstream_port=port)
    await resolver.start()
    return resolver, upstream


def ask(name: str, rdtype: str = "A"):
    return dns.message.make_query(name, rdtype)


def test_public_names_resolve_to_the_service_address(run):
    async def go():
        resolver, upstream = await resolver_with_upstream()
        try:
            for name in ("8000-i0abc.corral.localhost", "api.corral.localhost", "corral.localhost"):
                reply = await dns.asyncquery.udp(ask(name), "127.0.0.1", port=resolver.port, timeout=2)
                assert reply.rcode() == dns.rcode.NOERROR
                assert [r.address for r in reply.answer[0]] == [str(SERVICE)]
            assert upstream.asked == []  # never forwarded
        finally:
            await resolver.close()
            upstream.transport.close()
    run(go())


def test_other_types_under_the_domain_are_empty_answers(run):
    async def go():
        resolver, upstream = await resolver_with_upstream()
        try:
            reply = await dns.asyncquery.udp(ask("8000-i0abc.corral.localhost", "AAAA"), "127.0.0.1",
                                             port=resolver.port, timeout=2)
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []
        finally:
            await resolver.close()
            upstream.transport.close()
    run(go())


def test_other_names_are_forwarded_over_udp_and_tcp(run):
    async def go():
        resolver, upstream = await resolver_with_upstream()
        try:
            reply = await dns.asyncquery.udp(ask("example.org"), "127.0.0.1", port=resolver.port, timeout=2)
            assert [r.address for r in reply.answer[0]] == ["192.0.2.7"]
            # A name that only looks like the domain is not under it.
            reply = await dns.asyncquery.udp(ask("xcorral.localhost"), "127.0.0.1", port=resolver.port, timeout=2)
            assert [r.address for r in reply.answer[0]] == ["192.0.2.7"]
            assert upstream.asked == ["example.org.", "xcorral.localhost."]
            local = await dns.asyncquery.tcp(ask("api.corral.localhost"), "127.0.0.1", port=resolver.port, timeout=2)
            assert [r.address for r in local.answer[0]] == [str(SERVICE)]
        finally:
            await resolver.close()
            upstream.transport.close()
    run(go())


def test_an_unreachable_upstream_gives_servfail(run):
    async def go():
        resolver, upstream = await resolver_with_upstream(up=False)
        try:
            reply = await dns.asyncquery.udp(ask("example.org"), "127.0.0.1", port=resolver.port, timeout=10)
            assert reply.rcode() == dns.rcode.SERVFAIL
        finally:
            await resolver.close()
            upstream.transport.close()
    run(go())


def test_garbage_is_dropped_and_the_server_goes_on(run):
    async def go():
        resolver, upstream = await resolver_with_upstream()
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=("127.0.0.1", resolver.port))
            transport.sendto(b"\x00\x01not dns at all")
            transport.close()
            reply = await dns.asyncquery.udp(ask("api.corral.localhost"), "127.0.0.1", port=resolver.port, timeout=2)
            assert reply.rcode() == dns.rcode.NOERROR
        finally:
            await resolver.close()
            upstream.transport.close()
    run(go())
