"""The nftables table that isolates sandboxes. One static ruleset per Corral instance; per-sandbox state
is only an element in the `offline` set (sandboxes whose internet access is off).

What a sandbox may reach:
* the internet (unless offline), source-NATed to the host's address, within its egress rules by address
  (`egress_allow` elements `<sandbox> . <cidr>` win over `offline` and `egress_deny`);
* DNS at the fixed `dns_address`, DNAT-ed to the host's resolver (even if that sits in a private range),
  or, while the server serves public URLs, to its DNS server at the instance's service address;
* the server's public URLs (HTTPS on the service address), unless offline;
* nothing else: not the host (any of its addresses), not other sandboxes, not private, CGNAT,
  link-local (incl. 169.254.169.254 metadata), loopback or multicast ranges.
Nobody but the host itself may open connections into a sandbox.
"""

from __future__ import annotations

import ipaddress
import json

from corral.network.commands import run, run_sync

BLOCKED_RANGES = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
)
METADATA_ADDRESS = "169.254.169.254"


def table_name(instance: str) -> str:
    return f"corral_{instance}"


# Where the server's egress proxy listens on the service address (network/egress_proxy.py).
EGRESS_PROXY_PORT = 15001


def ruleset(instance: str, network: ipaddress.IPv4Network, dns_address: ipaddress.IPv4Address,
            resolvers: list[ipaddress.IPv4Address], service: ipaddress.IPv4Address | None = None,
            public: bool = False) -> str:
    """`service`: the server's own address for sandboxes (network/service.py), where its egress proxy
    takes the ports 80 and 443 of sandboxes with domain rules (set `proxied`); with `public` also its DNS
    server (instead of the host's resolver) and its port 443 (public URLs), for sandboxes whose internet
    access is on."""
    table = table_name(instance)
    ifaces = f'"cr{instance}h*"'
    blocked = ", ".join([*BLOCKED_RANGES, str(network)])
    resolver_set = ", ".join(str(r) for r in resolvers)
    dnat, service_rules = "", ""
    dns_target = service if public else (resolvers[0] if resolvers else None)
    if dns_target is not None:
        # One upstream is enough for DNAT; the others stay allowed in case the first is replaced.
        dnat = (f"    iifname {ifaces} ip daddr {dns_address} meta l4proto {{ tcp, udp }} th dport 53 "
                f"dnat ip to {dns_target}\n")
    if service is not None:
        # The proxy decides for proxied sandboxes whatever their internet switch says (allowOut may
        # override it): its DNAT happens before the forward chain, so it is accepted before `offline`.
        dnat += (f"    iifname {ifaces} ip saddr @proxied tcp dport {{ 80, 443 }} "
                 f"dnat ip to {service}:{EGRESS_PROXY_PORT}\n")
        # Domain rules need names resolved, also with the internet off (E2B opens DNS for them too).
        service_rules = (f"    iifname {ifaces} ip saddr @proxied ip daddr {service} tcp dport {EGRESS_PROXY_PORT} "
                         f"ct status dnat accept\n"
                         f"    iifname {ifaces} ip saddr @proxied ip daddr {service} meta l4proto {{ tcp, udp }} "
                         f"th dport 53 accept\n")
    if service is not None and public:
        service_rules += (
            f"    iifname {ifaces} ip saddr @offline counter drop comment \"internet access off\"\n"
            f"    iifname {ifaces} ip daddr {service} meta l4proto {{ tcp, udp }} th dport 53 accept\n"
            f"    iifname {ifaces} ip daddr {service} tcp dport 443 accept comment \"public URLs\"\n")
    resolver_elements = f"elements = {{ {resolver_set} }}" if resolvers else ""
    return f"""table inet {table}
delete table inet {table}
table inet {table} {{
  set offline {{ type ipv4_addr; }}
  set resolvers {{ type ipv4_addr; {resolver_elements} }}
  set blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {blocked} }} }}
  set proxied {{ type ipv4_addr; }}
  set egress_allow {{ type ipv4_addr . ipv4_addr; flags interval; }}
  set egress_deny {{ type ipv4_addr . ipv4_addr; flags interval; }}
  chain antispoof {{
    type filter hook prerouting priority raw; policy accept;
    iifname {ifaces} fib saddr . iif oif missing counter drop comment "source not reachable back through its own veth"
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{dnat}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {network} ip daddr != {network} masquerade
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {ifaces} ct state established,related accept
{service_rules}    iifname {ifaces} counter drop comment "sandboxes may not reach host services"
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {ifaces} meta nfproto ipv6 counter drop comment "sandboxes have no IPv6"
    iifname {ifaces} ip saddr != @offline ct status dnat ip daddr @resolvers th dport 53 accept
    iifname {ifaces} ip saddr @proxied ct status dnat ip daddr @resolvers th dport 53 accept
    iifname {ifaces} ip daddr {METADATA_ADDRESS} counter drop comment "cloud metadata"
    iifname {ifaces} ip daddr @blocked counter drop comment "private, local and sandbox ranges"
    iifname {ifaces} ip saddr . ip daddr @egress_allow accept comment "allowOut: wins over the rest"
    iifname {ifaces} ip saddr @offline counter drop comment "internet access off"
    iifname {ifaces} ip saddr . ip daddr @egress_deny counter drop comment "denyOut"
    iifname {ifaces} accept
    oifname {ifaces} ct state established,related accept
    oifname {ifaces} counter drop comment "no inbound connections to sandboxes"
  }}
}}
"""


async def install(instance: str, network: ipaddress.IPv4Network, dns_address: ipaddress.IPv4Address,
                  resolvers: list[ipaddress.IPv4Address], service: ipaddress.IPv4Address | None = None,
                  public: bool = False) -> None:
    """Replaces the table atomically (one nft transaction) and turns on IPv4 forwarding."""
    await run(["nft", "-f", "-"], ruleset(instance, network, dns_address, resolvers, service, public))
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


async def set_offline(instance: str, guest: ipaddress.IPv4Address, offline: bool) -> None:
    verb = "add" if offline else "delete"
    await run(["nft", verb, "element", "inet", table_name(instance), "offline", f"{{ {guest} }}"],
              check=offline)


async def set_proxied(instance: str, guest: ipaddress.IPv4Address, proxied: bool) -> None:
    """Sends the sandbox's new connections to ports 80 and 443 through the egress proxy, or stops it."""
    verb = "add" if proxied else "delete"
    await run(["nft", verb, "element", "inet", table_name(instance), "proxied", f"{{ {guest} }}"], check=proxied)


async def set_egress_rules(instance: str, guest: ipaddress.IPv4Address, allow: tuple[str, ...],
                           deny: tuple[str, ...], *, previous: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
                           ) -> None:
    """Replaces the sandbox's allow and deny elements (`previous`: what it had) in one nft transaction, so
    no connection sees a mix of old and new rules."""
    table = table_name(instance)
    commands = []
    for name, old, new in (("egress_allow", previous[0], allow), ("egress_deny", previous[1], deny)):
        if old:
            commands.append(f"delete element inet {table} {name} {{ {', '.join(f'{guest} . {c}' for c in old)} }}")
        if new:
            commands.append(f"add element inet {table} {name} {{ {', '.join(f'{guest} . {c}' for c in new)} }}")
    if commands:
        await run(["nft", "-f", "-"], "\n".join(commands) + "\n")


def offline_addresses(instance: str) -> set[str]:
    out = run_sync(["nft", "-j", "list", "set", "inet", table_name(instance), "offline"], check=False)
    try:
        data = json.loads(out)
    except ValueError:
        return set()
    for item in data.get("nftables", []):
        if "set" in item:
            return {e if isinstance(e, str) else str(e) for e in item["set"].get("elem", [])}
    return set()


async def seal(instance: str) -> None:
    """Holds every packet from the instance's sandboxes (a table of its own, so the main table can be
    replaced under it) while their rules are being put back."""
    ifaces = f'"cr{instance}h*"'
    await run(["nft", "-f", "-"], f"""table inet {table_name(instance)}_seal
delete table inet {table_name(instance)}_seal
table inet {table_name(instance)}_seal {{
  chain forward {{ type filter hook forward priority filter - 10; policy accept; iifname {ifaces} drop; }}
  chain input {{ type filter hook input priority filter - 10; policy accept; iifname {ifaces} drop; }}
}}
""")


def unseal(instance: str) -> None:
    run_sync(["nft", "delete", "table", "inet", f"{table_name(instance)}_seal"], check=False)


def remove(instance: str) -> None:
    run_sync(["nft", "delete", "table", "inet", table_name(instance)], check=False)
    unseal(instance)
