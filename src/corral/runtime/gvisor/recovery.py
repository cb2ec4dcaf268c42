"""Start-up recovery: adopts every sandbox a previous process left fully up and removes everything else
it made (containers, network slots, mounts, directories, cgroups). Runs only under the instance lock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from corral.network.slots import Slot, destroy_slot
from corral.runtime.base import ContainerState
from corral.runtime.gvisor import running
from corral.runtime.gvisor.cgroups import ROOT as CGROUP_ROOT
from corral.runtime.gvisor.containers import Container, config_from_record
from corral.runtime.gvisor.host import kill_and_reap, until_gone
from corral.runtime.gvisor.runsc import RunscError
from corral.storage.disk import mounts_under, remove_tree, unmount

if TYPE_CHECKING:
    from corral.runtime.gvisor.runtime import GVisorRuntime

log = logging.getLogger(__name__)


async def reconcile(rt: GVisorRuntime) -> None:
    records: dict[str, dict] = {}
    for entry in rt.sandboxes_dir.iterdir() if rt.sandboxes_dir.exists() else []:
        try:
            records[entry.name] = json.loads((entry / "record.json").read_text())
        except (OSError, ValueError):
            continue
    orphans = rt.runsc.cli_processes()
    await kill_and_reap(orphans)
    await until_gone(orphans)
    containers = set(await rt.runsc.list_ids())
    # A previous process may have left sandboxes frozen; runsc cannot talk to a frozen sandbox (and a
    # frozen process does not even die of SIGKILL), so everything is thawed before anything else.
    for sid in containers | set(records):
        rt._cgroup(sid).thaw()
    netns = rt.slots.existing()
    adopted: set[str] = set()
    for sid, data in records.items():
        if rt.table.get(sid) is not None or sid not in containers or data["slot"] not in netns:
            continue
        try:
            state = await rt.runsc.state(sid)
        except RunscError:
            continue
        c = Container(id=sid, template=data["template"], slot=rt.slots.claim(data["slot"]),
                      config=config_from_record(data["config"]), lowers=[Path(p) for p in data["lowers"]],
                      dir=rt.sandboxes_dir / sid, created_at=data["created_at"],
                      command=data.get("command", []), cwd=data.get("cwd", "/"))
        if state.status not in ("running", "paused") or not os.path.ismount(c.rootfs):
            rt.slots.release(c.slot)
            continue
        if state.status == "paused":
            # Stopped only for the moment of a checkpoint when the previous process died.
            try:
                await rt.runsc.resume(sid)
            except RunscError as exc:
                log.warning("sandbox %s was left stopped by a checkpoint and does not resume: %s", sid, exc)
                rt.slots.release(c.slot)
                continue
        rt.table.add(c)
        for state_ in (ContainerState.PREPARED, ContainerState.STARTING, ContainerState.LIVE):
            rt.table.move(c, state_)
        adopted.add(sid)
        await running.apply_egress(rt, c)  # the firewall's table was just made anew
    for cid in containers - adopted:
        with contextlib.suppress(RunscError):
            await rt.runsc.delete(cid)
    adopted_slots = {rt.table.get(sid).slot.index for sid in adopted}
    for index in netns - adopted_slots:
        await destroy_slot(Slot(index, rt.settings.instance, rt.settings.sandbox_network))
    for mountpoint in mounts_under(rt.sandboxes_dir):
        if mountpoint.relative_to(rt.sandboxes_dir).parts[0] not in adopted:
            with contextlib.suppress(Exception):
                await unmount(mountpoint)
    for entry in list(rt.sandboxes_dir.iterdir()):
        if entry.name not in adopted:
            remove_tree(entry)
    await _remove_stale_cgroups(rt, adopted)


async def _remove_stale_cgroups(rt: GVisorRuntime, keep: set[str]) -> None:
    """Removes this instance's sandbox cgroups other than `keep`, killing what is still in them: a
    `runsc create` killed half-way (the server stopped during a pool refill) leaves a gVisor sandbox and
    gofer that runsc has no state for, so only their cgroup still knows them."""
    relative = rt.cgroup_parent.lstrip("/")
    parents = [CGROUP_ROOT / relative] + [c / relative for c in CGROUP_ROOT.iterdir() if c.is_dir()]
    stale = {child.name for parent in parents if parent.is_dir()
             for child in parent.iterdir() if child.is_dir() and child.name not in keep}
    for sid in stale:
        rt._cgroup(sid).thaw()
        await kill_and_reap(rt._container_pids(sid))
    # Killed processes that are not our children leave their cgroup only once they have fully exited.
    for _ in range(100):  # up to 5 s
        if not any(rt._container_pids(sid) for sid in stale):
            break
        await asyncio.sleep(0.05)
    for parent in parents:
        for sid in stale:
            with contextlib.suppress(OSError):
                (parent / sid).rmdir()
