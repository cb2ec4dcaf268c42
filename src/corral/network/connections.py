"""TCP connections from the host to sandbox addresses: whether a port accepts one, and how many are open
(read from the kernel's socket table)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

# /proc/net/tcp states in which the sandbox's side may still be open: everything but TIME_WAIT (06: the
# peer has sent its FIN) and CLOSE (07).
_CLOSED_STATES = {"06", "07"}


def _hex_ipv4(address: str) -> str:
    """The address as /proc/net/tcp writes it: the 32-bit value in host byte order, in hex."""
    packed = ipaddress.IPv4Address(address).packed
    return f"{struct.unpack('=I', packed)[0]:08X}"


def open_connections_to(address: str, table: str = "/proc/net/tcp") -> int:
    """How many TCP connections of this network namespace to `address` the far end may not have closed."""
    wanted = _hex_ipv4(address)
    count = 0
    with open(table) as f:
        next(f, None)  # header
        for line in f:
            fields = line.split()
            if len(fields) > 3 and fields[2].partition(":")[0] == wanted and fields[3] not in _CLOSED_STATES:
                count += 1
    return count


async def port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether `host:port` accepts a TCP connection within `timeout` (the connection is closed at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


__all__ = ["open_connections_to", "port_accepts"]
