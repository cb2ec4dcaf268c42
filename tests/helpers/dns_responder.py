"""A DNS server for tests: answers every A query with the address given on the command line."""

import sys

from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer


class FixedResolver(BaseResolver):
    def __init__(self, answer: str) -> None:
        self.answer = answer

    def resolve(self, request, handler):
        reply = request.reply()
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.answer), ttl=60))
        return reply


if __name__ == "__main__":
    bind, answer = sys.argv[1], sys.argv[2]
    server = DNSServer(FixedResolver(answer), address=bind, port=53)
    server.start()
