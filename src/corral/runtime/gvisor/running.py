"""Work on a running gVisor container: commands run with `runsc exec`, its resource use, and its egress rules
(the internet switch and rules by address: elements of the instance's nftables sets, keyed by its address)."""

from __future__ import annotations

import json
import secrets
from dataclasses import replace
from typing import TYPE_CHECKING

from corral.network import firewall
from corral.runtime.base import ExecResult, SandboxFailed, Stats
from corral.runtime.gvisor import oci
from corral.runtime.gvisor.containers import Container
from corral.storage.disk import usage

if TYPE_CHECKING:
    from corral.runtime.gvisor.runtime import GVisorRuntime


async def exec_in(rt: GVisorRuntime, c: Container, argv: list[str], *, env: dict[str, str] | None,
                  cwd: str | None, user: str | None, timeout: float, on_output=None) -> ExecResult:
    await rt._settle(c)
    uid, gid = oci.parse_user(user)
    process = c.dir / f"exec-{secrets.token_hex(6)}.json"
    process.write_text(json.dumps(oci.exec_process(argv, env=env or {}, cwd=cwd or "/", uid=uid, gid=gid)))
    try:
        with rt._awake(c):
            code, out, err = await rt.runsc.exec(c.id, process, timeout=timeout, on_output=on_output)
    except TimeoutError:
        raise SandboxFailed(f"command {argv[0]!r} did not finish within {timeout:.0f}s") from None
    finally:
        process.unlink(missing_ok=True)
    return ExecResult(exit_code=code, stdout=out, stderr=err)


async def stats_of(rt: GVisorRuntime, c: Container) -> Stats:
    await rt._settle(c)
    used, total = usage(c.disk)
    if rt._cgroup(c.id).is_frozen():
        # runsc would ask the frozen gVisor kernel; nothing in it moved since it was frozen.
        last = c.last_stats or Stats(0.0, 0, 0, 0)
        return Stats(cpu_seconds=last.cpu_seconds, memory_bytes=last.memory_bytes, disk_used_bytes=used,
                     disk_total_bytes=total)
    data = (await rt.runsc.events_stats(c.id)).get("data", {})
    cpu_ns = data.get("cpu", {}).get("usage", {}).get("total", 0)
    memory = data.get("memory", {}).get("usage", {}).get("usage", 0)
    c.last_stats = Stats(cpu_seconds=cpu_ns / 1e9, memory_bytes=memory, disk_used_bytes=used,
                         disk_total_bytes=total)
    return c.last_stats


def proxied(config) -> bool:
    """Its ports 80 and 443 go through the egress proxy: it has domain rules or header rules."""
    return bool(config.egress_domains or config.egress_rules)


async def apply_egress(rt: GVisorRuntime, c: Container) -> None:
    """The container's egress rules (its config's) into the firewall, as it starts."""
    if not c.config.internet:
        await firewall.set_offline(rt.settings.instance, c.slot.guest, True)
    if c.config.egress_allow or c.config.egress_deny:
        await firewall.set_egress_rules(rt.settings.instance, c.slot.guest, c.config.egress_allow,
                                        c.config.egress_deny)
    if proxied(c.config):
        await firewall.set_proxied(rt.settings.instance, c.slot.guest, True)


async def drop_egress(rt: GVisorRuntime, c: Container) -> None:
    """Removes the container's rules from the firewall (its address goes to another sandbox next)."""
    if not c.config.internet:
        await firewall.set_offline(rt.settings.instance, c.slot.guest, False)
    if c.config.egress_allow or c.config.egress_deny:
        await firewall.set_egress_rules(rt.settings.instance, c.slot.guest, (), (),
                                        previous=(c.config.egress_allow, c.config.egress_deny))
    if proxied(c.config):
        await firewall.set_proxied(rt.settings.instance, c.slot.guest, False)


async def set_egress(rt: GVisorRuntime, c: Container, *, internet: bool | None = None,
                     allow: tuple[str, ...] | None = None, deny: tuple[str, ...] | None = None,
                     domains: tuple[str, ...] | None = None, rules: dict | None = None) -> None:
    """Changes what a live container may reach; what is not given stays as it is."""
    config = c.config
    internet = config.internet if internet is None else internet
    allow = config.egress_allow if allow is None else allow
    deny = config.egress_deny if deny is None else deny
    domains = config.egress_domains if domains is None else domains
    rules = config.egress_rules if rules is None else rules
    now_proxied = bool(domains or rules)
    if now_proxied != proxied(config):
        await firewall.set_proxied(rt.settings.instance, c.slot.guest, now_proxied)
    if internet != config.internet:
        await firewall.set_offline(rt.settings.instance, c.slot.guest, not internet)
    if (allow, deny) != (config.egress_allow, config.egress_deny):
        await firewall.set_egress_rules(rt.settings.instance, c.slot.guest, allow, deny,
                                        previous=(config.egress_allow, config.egress_deny))
    c.config = replace(config, internet=internet, egress_allow=allow, egress_deny=deny, egress_domains=domains,
                       egress_rules=rules)
    c.write_record()
