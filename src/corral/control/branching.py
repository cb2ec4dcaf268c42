"""Pause and resume, snapshots and forks: checkpoints of sandboxes (nodes of control/tree.py) and sandboxes
started from them.

Ordering for crash safety: a node is recorded (not ready) before its files are written and marked ready
after; a pause records the sandbox as paused before the checkpoint and clears its runtime id after.
control/recovery.py finishes or undoes whatever a killed server left between those steps.

Builds on control/sandboxes.py (records, timers, the per-sandbox lock) and provides what it needs back
(`CheckpointHooks`: create from a snapshot name, pause on timeout, a killed sandbox's pause nodes)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.orm import Session

from corral.control import events
from corral.control.db import CheckpointRow, Database, SandboxRow, TeamRow
from corral.control.errors import ApiError
from corral.control.keys import Owner, TeamQuota, check_key_limits, owner_of
from corral.control.metering import settle_sandbox
from corral.control.network import Egress, Ingress
from corral.control.sandboxes import Sandboxes
from corral.control.tree import CheckpointTree
from corral.observability.metrics import UNSCRAPED, ServerMetrics
from corral.orchestrator.sandboxes import Orchestrator
from corral.runtime.base import Resources

log = logging.getLogger("corral.branching")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
MAX_FORKS = 100


class Branching:
    def __init__(self, database: Database, sandboxes: Sandboxes, tree: CheckpointTree,
                 orchestrator: Orchestrator, *, is_template: Callable[[str], bool]) -> None:
        self._db = database
        self._sandboxes = sandboxes
        self._tree = tree
        self._orchestrator = orchestrator
        # Snapshot names may not shadow templates.
        self._is_template = is_template
        # The name of a built template by its id, for keys whose allow-list names it (control/plane.py).
        self.template_name: Callable[[Owner, str], Awaitable[str | None]] = _no_name
        self.metrics: ServerMetrics = UNSCRAPED  # the server's, handed in by control/plane.py

    # --- pause and resume ------------------------------------------------------------------------

    async def pause(self, owner: Owner, sandbox_id: str, *, memory: bool = True, reason: str = "request") -> None:
        async with self._sandboxes.locks[sandbox_id]:
            row = await self._sandboxes.get(owner, sandbox_id)
            if row.state == "paused":
                raise ApiError(409, f"sandbox {sandbox_id} is already paused")
            node = await self._tree.record(row, "pause", memory=memory, metadata={"reason": reason})

            def paused(session: Session) -> None:
                stored = session.get(SandboxRow, sandbox_id)
                settle_sandbox(session, stored, time.time())  # a paused sandbox holds no CPU or memory
                stored.state, stored.paused_node = "paused", node.id
                stored.pause_mode = "full" if memory else "filesystem"

            def running(session: Session) -> SandboxRow:
                stored = session.get(SandboxRow, sandbox_id)
                stored.state, stored.paused_node, stored.pause_mode = "running", None, None
                return stored

            def stopped(session: Session) -> None:
                session.get(SandboxRow, sandbox_id).runtime_id = None

            await self._db.write(paused)
            self._sandboxes.went_offline(sandbox_id)
            try:
                await self._orchestrator.pause(sandbox_id, self._tree.files.path(node.id), memory=memory)
            except BaseException:
                stored = await self._db.write(running)
                await self._tree.drop(node.id)
                if sandbox_id in self._orchestrator.live_ids():
                    self._sandboxes.came_online(stored)
                raise
            await self._tree.mark_ready(node, head_of=sandbox_id)
            await self._db.write(stopped)
        log.info("paused %s into %s (%s)", sandbox_id, node.id, reason)
        await self._sandboxes.announce(row, events.PAUSED, reason=reason, memory=memory)

    async def resume(self, owner: Owner, sandbox_id: str, *, timeout: int | None,
                     memory: bool = True) -> tuple[SandboxRow, bool]:
        """Resumes a paused sandbox (True) or, if it runs, extends its timeout (False)."""
        started = time.perf_counter()
        async with self._sandboxes.locks[sandbox_id]:
            row = await self._sandboxes.get(owner, sandbox_id)
            if row.state == "running":
                return await self._sandboxes.extend(owner, sandbox_id, timeout), False
            seconds = self._sandboxes.timeout_for(timeout if timeout is not None else row.timeout_s)
            check_key_limits(owner.limits, row.template, _resources(row), seconds,
                             await self.template_name(owner, row.template))
            node_id = row.paused_node
            node = await self._db.read(lambda session: session.get(CheckpointRow, node_id))
            async with self._sandboxes.admission.starting(owner, _resources(row), timeout_s=seconds):
                with self._tree.reading(node_id):
                    async with self._sandboxes.attaching(row.volume_mounts) as volumes:
                        _, sandbox = await self._orchestrator.start_from(
                            self._tree.files.snapshot(node_id), sandbox_id=sandbox_id, token=row.envd_token,
                            current_token=row.envd_token, env_vars=row.env_vars or {}, internet=row.internet,
                            resources=_resources(row), memory=memory and row.pause_mode == "full",
                            volumes=volumes, **_egress_args(row.egress))
                def resumed(session: Session) -> SandboxRow:
                    stored = session.get(SandboxRow, sandbox_id)
                    stored.state, stored.runtime_id = "running", sandbox.id
                    stored.paused_node, stored.pause_mode = None, None
                    stored.started_at = stored.metered_at = time.time()  # runs (and is metered) anew from here
                    stored.oom_kills = 0  # envd counts them anew from its /init
                    stored.end_at, stored.timeout_s = time.time() + seconds, seconds
                    return stored

                stored = await self._db.write(resumed)
            # The sandbox runs on from this point; its memory image would only be a copy of the past. The
            # layer stays: the sandbox stands on it.
            if node is not None:
                await self._tree.drop_memory(node_id)
            self._sandboxes.came_online(stored)
            self.metrics.resume_seconds.observe(time.perf_counter() - started)
        await self._sandboxes.announce(stored, events.RESUMED)
        return stored, True

    async def auto_resume(self, sandbox_id: str) -> bool:
        """For the proxy: resumes a paused sandbox created with autoResume; False if it may not."""
        row = await self._sandboxes.row(sandbox_id)
        if row is None or not (row.lifecycle or {}).get("autoResume"):
            return False
        # Within the team's quota and spending cap as they are now (a sandbox paused at the cap stays paused).
        team = await self._db.read(lambda session: session.get(TeamRow, row.team_id)) if row.team_id else None
        owner = dataclasses.replace(owner_of(row), quota=TeamQuota.of(team))
        try:
            await self.resume(owner, sandbox_id, timeout=row.timeout_s)
        except Exception as e:
            log.warning("auto-resume of %s failed: %s", sandbox_id, e)
            return False
        return True

    # --- snapshots and forks ---------------------------------------------------------------------

    def _check_name(self, name: str | None) -> None:
        if name is None:
            return
        if not _NAME.match(name):
            raise ApiError(400, f"snapshot name {name!r} must be 1-128 characters of letters, digits and ._:/- "
                                "starting with a letter or digit")
        if self._is_template(name):
            raise ApiError(400, f"snapshot name {name!r} is the name of a template")

    async def snapshot(self, owner: Owner, sandbox_id: str, *, name: str | None = None, memory: bool = True,
                       metadata: dict | None = None, kind: str = "snapshot", clones: int = 0) -> CheckpointRow:
        node = await self._snapshot(owner, sandbox_id, name=name, memory=memory, metadata=metadata, kind=kind,
                                    clones=clones)
        if kind == "snapshot":
            await self._sandboxes.announce_of(node.team_id or node.key_id, sandbox_id, events.CHECKPOINTED,
                                              snapshotID=node.id, name=node.name, memory=node.memory)
        return node

    async def _snapshot(self, owner: Owner, sandbox_id: str, *, name: str | None, memory: bool,
                        metadata: dict | None, kind: str, clones: int) -> CheckpointRow:
        self._check_name(name)
        async with self._sandboxes.locks[sandbox_id]:
            row = await self._sandboxes.get(owner, sandbox_id)
            if row.state == "paused":
                # The pause checkpoint already is this state: share its files.
                node = await self._tree.record(row, kind, memory=row.pause_mode == "full", name=name,
                                               metadata=metadata, parent=row.paused_node)
                try:
                    await asyncio.to_thread(self._tree.files.link_copy, row.paused_node, node.id)
                except BaseException:
                    await self._tree.drop(node.id)
                    raise
                return await self._tree.mark_ready(node)
            node = await self._tree.record(row, kind, memory=memory, name=name, metadata=metadata)
            try:
                await self._orchestrator.checkpoint(sandbox_id, self._tree.files.path(node.id), memory=memory,
                                                    clones=clones)
            except BaseException:
                await self._tree.drop(node.id)
                raise
            return await self._tree.mark_ready(node, head_of=sandbox_id)

    async def fork(self, owner: Owner, sandbox_id: str, *, count: int,
                   timeout: int | None) -> list[SandboxRow | BaseException]:
        started = time.perf_counter()
        if not 1 <= count <= MAX_FORKS:
            raise ApiError(400, f"count must be between 1 and {MAX_FORKS}, got {count}")
        row = await self._sandboxes.get(owner, sandbox_id)
        seconds = self._sandboxes.timeout_for(timeout)
        check_key_limits(owner.limits, row.template, _resources(row), seconds,
                         await self.template_name(owner, row.template))
        async with self._sandboxes.admission.starting(owner, _resources(row), count, timeout_s=seconds):
            results = await self._fork(owner, sandbox_id, count=count, timeout=timeout)
        self.metrics.fork_seconds.observe(time.perf_counter() - started)
        children = [r.id for r in results if isinstance(r, SandboxRow)]
        await self._sandboxes.announce(row, events.FORKED, children=children, failed=len(results) - len(children))
        return results

    async def start_from_node(self, owner: Owner, ref: str, count: int, *, timeout: int | None,
                              metadata: dict[str, str], env_vars: dict[str, str] | None) -> list:
        """`POST /checkpoints/{ref}/sandboxes`: `count` new sandboxes from the node, within the key's limits
        and the team's quota."""
        node = await self._tree.node(owner, ref)
        seconds = self._sandboxes.timeout_for(timeout)
        check_key_limits(owner.limits, node.template, _resources(node), seconds,
                         await self.template_name(owner, node.template))
        async with self._sandboxes.admission.starting(owner, _resources(node), count, timeout_s=seconds):
            return await self.start_from(node, count, maker=owner, timeout=seconds, metadata=metadata,
                                         env_vars=env_vars or node.env_vars, lifecycle={}, internet=node.internet)

    async def _fork(self, owner: Owner, sandbox_id: str, *, count: int,
                    timeout: int | None) -> list[SandboxRow | BaseException]:
        if not 1 <= count <= MAX_FORKS:
            raise ApiError(400, f"count must be between 1 and {MAX_FORKS}, got {count}")
        row = await self._sandboxes.get(owner, sandbox_id)
        seconds = self._sandboxes.timeout_for(timeout)
        if row.state == "paused":
            # From the pause checkpoint itself; the lock keeps a resume from dropping its image meanwhile.
            async with self._sandboxes.locks[sandbox_id]:
                row = await self._sandboxes.get(owner, sandbox_id)
                if row.state == "paused":
                    node = await self._tree.node(owner, row.paused_node)
                    return await self.start_from(node, count, maker=owner, timeout=seconds,
                                                 metadata=row.sandbox_metadata or {},
                                                 env_vars=row.env_vars or {}, lifecycle=row.lifecycle or {},
                                                 internet=row.internet, template=row.template,
                                                 ingress=Ingress.from_record(row.ingress),
                                                 egress=Egress.from_record(row.egress))
        began = time.perf_counter()
        node = await self.snapshot(owner, sandbox_id, kind="fork", clones=count)
        snapshotted = time.perf_counter()
        results = await self.start_from(node, count, maker=owner, timeout=seconds, metadata=row.sandbox_metadata or {},
                                        env_vars=row.env_vars or {}, lifecycle=row.lifecycle or {},
                                        internet=row.internet, template=row.template,
                                        ingress=Ingress.from_record(row.ingress), egress=Egress.from_record(row.egress))
        log.debug("fork of %s x%d: snapshot %.1f ms, starts %.1f ms", sandbox_id, count,
                  (snapshotted - began) * 1000, (time.perf_counter() - snapshotted) * 1000)
        recordings = self._sandboxes.recordings
        if recordings is not None and await recordings.recording(sandbox_id):
            await asyncio.gather(*(recordings.drop_inherited(r.id) for r in results if isinstance(r, SandboxRow)))
        return results

    async def start_from(self, node: CheckpointRow, count: int, *, maker: Owner, timeout: int, metadata: dict,
                         env_vars: dict, lifecycle: dict, internet: bool, template: str | None = None,
                         ingress: Ingress | None = None, egress: Egress | None = None
                         ) -> list[SandboxRow | BaseException]:
        """`count` new sandboxes from a node, each succeeding or failing (the exception) on its own, each
        with `ingress`'s options and a traffic token of its own; `maker`'s key is recorded as their maker."""
        ingress, egress = ingress or Ingress(), egress or Egress()
        with self._tree.reading(node.id):
            return await asyncio.gather(*(
                self._start_one(node, maker, timeout=timeout, metadata=metadata, env_vars=env_vars,
                                lifecycle=lifecycle,
                                internet=internet, template=template or node.id,
                                ingress=ingress.for_another_sandbox(), egress=egress) for _ in range(count)),
                return_exceptions=True)

    async def _start_one(self, node: CheckpointRow, maker: Owner, *, timeout: int, metadata: dict, env_vars: dict,
                         lifecycle: dict, internet: bool, template: str, ingress: Ingress,
                         egress: Egress) -> SandboxRow:
        token = secrets.token_urlsafe(24)
        # A sandbox from a checkpoint mounts the volumes its source had: the same volumes, shared.
        async with self._sandboxes.attaching(node.volume_mounts) as volumes:
            api_id, sandbox = await self._orchestrator.start_from(
                self._tree.files.snapshot(node.id), sandbox_id=None, token=token, current_token=node.envd_token,
                env_vars=env_vars, internet=internet, resources=_resources(node), volumes=volumes,
                **_egress_args(egress.to_record()))
            row = SandboxRow(id=api_id, runtime_id=sandbox.id, key_id=maker.key_id, team_id=node.team_id,
                             template=template,
                             envd_token=token, sandbox_metadata=metadata, env_vars=env_vars, vcpus=node.vcpus,
                             memory_mb=node.memory_mb, disk_mb=node.disk_mb, internet=internet, lifecycle=lifecycle,
                             head=node.id, ingress=ingress.to_record(), egress=egress.to_record(),
                             volume_mounts=node.volume_mounts)
            return await self._sandboxes.register(row, timeout)

    # --- CheckpointHooks (for control/sandboxes.py) ----------------------------------------------

    async def start_from_snapshot(self, owner: Owner, ref: str, *, timeout: int, metadata: dict[str, str],
                                  env_vars: dict[str, str], internet: bool, lifecycle: dict,
                                  ingress: Ingress | None = None, egress: Egress | None = None,
                                  volume_mounts: list[dict] | None = None) -> SandboxRow | None:
        node = await self._tree.find_node(owner, ref)
        if node is None:
            return None
        if volume_mounts:
            raise ApiError(400, f"{ref} is a snapshot: a sandbox started from it mounts the volumes the snapshot "
                                "was taken with, and volumeMounts cannot be given")
        (result,) = await self.start_from(node, 1, maker=owner, timeout=timeout, metadata=metadata, env_vars=env_vars,
                                          lifecycle=lifecycle, internet=internet, ingress=ingress, egress=egress)
        if isinstance(result, BaseException):
            raise result
        return result

    async def snapshot_resources(self, owner: Owner, ref: str) -> Resources | None:
        node = await self._tree.find_node(owner, ref)
        return _resources(node) if node is not None else None

    async def forget_sandbox(self, sandbox_id: str) -> None:
        await self._tree.forget_sandbox(sandbox_id)


def _egress_args(record: dict | None) -> dict:
    egress = Egress.from_record(record)
    return {"allow_out": egress.allow, "deny_out": egress.deny, "allow_domains": egress.domains,
            "header_rules": egress.rules}


def _resources(row) -> Resources:
    return Resources(vcpus=row.vcpus, memory_mb=row.memory_mb, disk_mb=row.disk_mb)


async def _no_name(owner: Owner, template: str) -> str | None:
    return None
