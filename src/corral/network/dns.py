"""Finds the resolvers the host itself uses, so sandbox DNS can be forwarded to them."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

_CANDIDATES = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


def _nameservers(path: Path) -> list[ipaddress.IPv4Address]:
    found = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if isinstance(addr, ipaddress.IPv4Address):
                found.append(addr)
    return found


def upstream_resolvers() -> list[ipaddress.IPv4Address]:
    """IPv4 resolvers sandboxes may query. CORRAL_DNS_UPSTREAM (comma-separated) overrides discovery.

    A loopback resolver (systemd-resolved's 127.0.0.53) cannot be reached from a forwarded packet, so
    like Docker we fall back to the real upstreams systemd-resolved lists.
    """
    override = os.environ.get("CORRAL_DNS_UPSTREAM")
    if override:
        return [ipaddress.IPv4Address(a.strip()) for a in override.split(",") if a.strip()]
    for path in _CANDIDATES:
        usable = [a for a in _nameservers(path) if not a.is_loopback]
        if usable:
            return usable
    return []
