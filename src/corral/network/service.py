"""The instance's service address: where sandboxes reach the server itself (its DNS server and the HTTPS
listener for public URLs) while it serves public URLs. A link-local /32 on the host's loopback interface
(labelled `lo:cr<instance>`), out of 169.254.54.0/24: sandboxes route it to the host like any address,
and nothing outside the host can reach it (link-local is never routed). Loopback rather than a dummy
interface: hosts (and containers) without the dummy module have it too."""

from __future__ import annotations

import ipaddress
import zlib

from corral.network.commands import run_sync

SERVICE_NETWORK = ipaddress.IPv4Network("169.254.54.0/24")


def label(instance: str) -> str:
    return f"lo:cr{instance}"[:15]  # the kernel's limit for a label


def default_address(instance: str) -> ipaddress.IPv4Address:
    """One address per instance name, stable across starts (.1 to .250)."""
    return SERVICE_NETWORK[1 + zlib.crc32(instance.encode()) % 250]


def add(instance: str, address: ipaddress.IPv4Address) -> None:
    """Puts the address on loopback (idempotent: a start after a crash finds it there)."""
    remove(instance)  # an address of an earlier start with other settings
    run_sync(["ip", "addr", "replace", f"{address}/32", "dev", "lo", "label", label(instance)])


def addresses(instance: str) -> list[str]:
    """The instance's service addresses on loopback (normally none or one)."""
    out = run_sync(["ip", "-o", "-4", "addr", "show", "dev", "lo", "label", label(instance)], check=False)
    return [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]


def remove(instance: str) -> None:
    for cidr in addresses(instance):
        run_sync(["ip", "addr", "del", cidr, "dev", "lo"], check=False)
