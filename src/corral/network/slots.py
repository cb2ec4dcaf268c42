"""Network slots: a network namespace with a veth pair to the host and a /30 out of the sandbox network.

Slot i owns addresses base+1 (host end, the sandbox's gateway) and base+2 (the sandbox), base = net + 4i.
The host reaches TCP ports inside at base+2 through the veth route. runsc moves the sandbox address
into its own netstack on every start and restore and never gives it back: a new slot has it (and its
default route) from `create_slot`, and a slot used again needs `configure_guest` before the next one.

The kernel is the source of truth for which slots exist (`ip netns list`); nothing else is stored.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from corral.network.commands import NetworkError, run

NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class Slot:
    index: int
    instance: str
    network: ipaddress.IPv4Network

    @property
    def netns(self) -> str:
        return f"corral-{self.instance}-{self.index}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def host_ifname(self) -> str:
        return f"cr{self.instance}h{self.index}"  # <= 15 chars for index < 10**8 with a 2-char instance

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 4 * self.index + 1

    @property
    def guest(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 4 * self.index + 2


class SlotAllocator:
    """Hands out free slot indexes."""

    def __init__(self, instance: str, network: ipaddress.IPv4Network) -> None:
        if network.prefixlen > 28:
            raise ValueError(f"sandbox network {network} is too small; use a /28 or larger")
        self.instance = instance
        self.network = network
        self.capacity = network.num_addresses // 4
        self._in_use: set[int] = set()

    def prefix(self) -> str:
        return f"corral-{self.instance}-"

    def existing(self) -> set[int]:
        """Slot indexes whose netns exists in the kernel now."""
        found = set()
        if NETNS_DIR.is_dir():
            for name in os.listdir(NETNS_DIR):
                if name.startswith(self.prefix()) and name[len(self.prefix()):].isdigit():
                    found.add(int(name[len(self.prefix()):]))
        return found

    def claim(self, index: int) -> Slot:
        self._in_use.add(index)
        return Slot(index, self.instance, self.network)

    def allocate(self) -> Slot:
        taken = self._in_use | self.existing()
        for index in range(self.capacity):
            if index not in taken:
                return self.claim(index)
        raise NetworkError(f"all {self.capacity} network slots of {self.network} are in use")

    def release(self, slot: Slot) -> None:
        self._in_use.discard(slot.index)


async def create_slot(slot: Slot) -> None:
    """Creates the netns and the veth pair; the host end gets the gateway address."""
    guest_tmp = f"cr{slot.instance}g{slot.index}"
    batch = "\n".join([
        f"netns add {slot.netns}",
        f"link add {slot.host_ifname} type veth peer name {guest_tmp} netns {slot.netns}",
        f"addr add {slot.gateway}/30 dev {slot.host_ifname}",
        f"link set {slot.host_ifname} up",
    ]) + "\n"
    try:
        await run(["ip", "-batch", "-"], batch)
        await run(["ip", "-n", slot.netns, "-batch", "-"],
                  f"link set {guest_tmp} name eth0\nlink set lo up\nlink set eth0 up\n"
                  f"addr replace {slot.guest}/30 dev eth0\nroute replace default via {slot.gateway}\n")
    except NetworkError:
        await destroy_slot(slot)
        raise


async def configure_guest(slot: Slot) -> None:
    """(Re)puts the sandbox address and default route into the netns, where runsc will pick them up."""
    await run(["ip", "-n", slot.netns, "-batch", "-"],
              f"addr replace {slot.guest}/30 dev eth0\nroute replace default via {slot.gateway}\n")


async def destroy_slot(slot: Slot) -> None:
    """Aborts the host's TCP connections to the sandbox address, then deletes the netns (which destroys
    its veth end, and with it the pair).

    Without the abort, a connection the host closed as the sandbox went away lingers as an orphan for up
    to two minutes (FIN-WAIT-1, retransmitting into a netns that no longer exists), and the next sandbox
    given this slot would count it as one of its own: its checkpoints would wait for it to close."""
    # Without `ss` (iproute2 has it) the netns still goes; the orphans then time out on their own.
    with contextlib.suppress(OSError):
        await run(["ss", "-K", "-t", "dst", str(slot.guest)], check=False)
    await run(["ip", "-force", "-batch", "-"],
              f"netns del {slot.netns}\nlink del {slot.host_ifname}\n", check=False)

