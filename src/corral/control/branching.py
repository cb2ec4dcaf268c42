"""Pause and resume, snapshots, forks and the checkpoint tree they form.

Every snapshot, pause and fork point is a node (CheckpointRow) whose parent is the node the sandbox's
state descended from (`SandboxRow.head`): a sandbox started from a template has no head, a sandbox started
from a node has that node, and each checkpoint taken of a sandbox becomes its new head. A lineage is the
tree of nodes reachable from one root.

Ordering for crash safety: a node is recorded (not ready) before its files are written and marked ready
after; a pause records the sandbox as paused before the checkpoint and clears its runtime id after.
`recover` finishes or undoes whatever a killed server left between those steps.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from corral.control.db import CheckpointRow, SandboxRow
from corral.control.lifecycle import ApiError, SandboxService
from corral.orchestrator.checkpoints import CheckpointFiles
from corral.orchestrator.envd_link import EnvdUnavailable
from corral.runtime.base import Resources, RuntimeError_

log = logging.getLogger("corral.branching")

_ID_ALPHABET = string.ascii_lowercase + string.digits
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
MAX_FORKS = 100


def new_node_id() -> str:
    return "n" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(19))


def _api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RuntimeError_):
        return ApiError(exc.status, str(exc))
    if isinstance(exc, EnvdUnavailable):
        return ApiError(500, f"the sandbox did not start: {exc}")
    return ApiError(500, f"{type(exc).__name__}: {exc}")


class Branching:
    def __init__(self, service: SandboxService, sessions: sessionmaker, files: CheckpointFiles) -> None:
        self._service = service
        self._sessions = sessions
        self.files = files
        self._orchestrator = service.orchestrator
        self._in_use: Counter[str] = Counter()  # nodes being read by a restore right now
        # Snapshot names may not shadow templates; the server tells us which names are templates.
        self.is_template: Callable[[str], bool] = lambda name: False

    # --- lookups ---------------------------------------------------------------------------------

    def _nodes(self, key_id: str) -> list[CheckpointRow]:
        with self._sessions() as session:
            stmt = select(CheckpointRow).where(CheckpointRow.key_id == key_id, CheckpointRow.ready.is_(True))
            return list(session.scalars(stmt.order_by(CheckpointRow.created_at, CheckpointRow.id)))

    def find_node(self, key_id: str, ref: str) -> CheckpointRow | None:
        """The node `ref` names: its id or (the latest node with) its name."""
        with self._sessions() as session:
            node = session.get(CheckpointRow, ref)
            if node is not None and node.key_id == key_id and node.ready:
                return node
            stmt = select(CheckpointRow).where(CheckpointRow.key_id == key_id, CheckpointRow.name == ref,
                                               CheckpointRow.ready.is_(True))
            return session.scalars(stmt.order_by(CheckpointRow.created_at.desc())).first()

    def node(self, key_id: str, ref: str) -> CheckpointRow:
        node = self.find_node(key_id, ref)
        if node is None:
            raise ApiError(404, f"checkpoint {ref} not found")
        return node

    def list_nodes(self, key_id: str, *, sandbox_id: str | None = None, name: str | None = None,
                   kinds: set[str] | None = None) -> list[CheckpointRow]:
        nodes = self._nodes(key_id)
        return [n for n in reversed(nodes)
                if (sandbox_id is None or n.sandbox_id == sandbox_id)
                and (name is None or name in (n.name, n.id))
                and (kinds is None or n.kind in kinds)]

    # --- pause and resume ------------------------------------------------------------------------

    def _record_node(self, row: SandboxRow, kind: str, *, memory: bool, name: str | None = None,
                     metadata: dict | None = None, parent: str | None = None) -> CheckpointRow:
        node = CheckpointRow(id=new_node_id(), key_id=row.key_id, kind=kind, parent_id=parent or row.head,
                             sandbox_id=row.id, template=row.template, name=name, node_metadata=metadata or {},
                             env_vars=row.env_vars or {}, envd_token=row.envd_token, memory=memory,
                             vcpus=row.vcpus, memory_mb=row.memory_mb, disk_mb=row.disk_mb, internet=row.internet,
                             created_at=time.time(), ready=False)
        with self._sessions.begin() as session:
            session.add(node)
        return node

    def _finish_node(self, node: CheckpointRow, *, head_of: str | None = None) -> CheckpointRow:
        with self._sessions.begin() as session:
            stored = session.get(CheckpointRow, node.id)
            stored.ready = True
            stored.memory = self.files.has_memory(node.id)
            stored.size_bytes = self.files.size(node.id)
            if stored.name:  # a name moves to its newest snapshot
                for other in session.scalars(select(CheckpointRow).where(
                        CheckpointRow.key_id == node.key_id, CheckpointRow.name == stored.name,
                        CheckpointRow.id != node.id)):
                    other.name = None
            if head_of is not None and (sandbox := session.get(SandboxRow, head_of)) is not None:
                sandbox.head = node.id
        return stored

    def _drop_node(self, node_id: str) -> None:
        with self._sessions.begin() as session:
            stored = session.get(CheckpointRow, node_id)
            if stored is not None:
                session.delete(stored)

    async def pause(self, key_id: str, sandbox_id: str, *, memory: bool = True, reason: str = "request") -> None:
        async with self._service.locks[sandbox_id]:
            row = self._service.get(key_id, sandbox_id)
            if row.state == "paused":
                raise ApiError(409, f"sandbox {sandbox_id} is already paused")
            node = self._record_node(row, "pause", memory=memory, metadata={"reason": reason})
            with self._sessions.begin() as session:
                stored = session.get(SandboxRow, sandbox_id)
                stored.state, stored.paused_node = "paused", node.id
                stored.pause_mode = "full" if memory else "filesystem"
            self._service.went_offline(sandbox_id)
            try:
                await self._orchestrator.pause(sandbox_id, self.files.path(node.id), memory=memory)
            except BaseException:
                with self._sessions.begin() as session:
                    stored = session.get(SandboxRow, sandbox_id)
                    stored.state, stored.paused_node, stored.pause_mode = "running", None, None
                self._drop_node(node.id)
                if sandbox_id in self._orchestrator.live_ids():
                    self._service.came_online(stored)
                raise
            self._finish_node(node, head_of=sandbox_id)
            with self._sessions.begin() as session:
                session.get(SandboxRow, sandbox_id).runtime_id = None
        log.info("paused %s into %s (%s)", sandbox_id, node.id, reason)

    async def resume(self, key_id: str, sandbox_id: str, *, timeout: int | None,
                     memory: bool = True) -> tuple[SandboxRow, bool]:
        """Resumes a paused sandbox (True) or, if it runs, extends its timeout (False)."""
        async with self._service.locks[sandbox_id]:
            row = self._service.get(key_id, sandbox_id)
            if row.state == "running":
                return self._service.extend(key_id, sandbox_id, timeout), False
            seconds = self._service.timeout_for(timeout if timeout is not None else row.timeout_s)
            node_id = row.paused_node
            with self._sessions() as session:
                node = session.get(CheckpointRow, node_id)
            self._in_use[node_id] += 1
            try:
                _, sandbox = await self._orchestrator.start_from(
                    self.files.snapshot(node_id), sandbox_id=sandbox_id, token=row.envd_token,
                    current_token=row.envd_token, env_vars=row.env_vars or {}, internet=row.internet,
                    resources=_resources(row), memory=memory and row.pause_mode == "full")
            finally:
                self._in_use[node_id] -= 1
            now = time.time()
            with self._sessions.begin() as session:
                stored = session.get(SandboxRow, sandbox_id)
                stored.state, stored.runtime_id = "running", sandbox.id
                stored.paused_node, stored.pause_mode = None, None
                stored.end_at, stored.timeout_s = now + seconds, seconds
            # The sandbox runs on from this point; its memory image would only be a copy of the past. The
            # layer stays: the sandbox stands on it.
            if node is not None:
                self.files.drop_memory(node_id)
                with self._sessions.begin() as session:
                    if (stored_node := session.get(CheckpointRow, node_id)) is not None:
                        stored_node.memory, stored_node.size_bytes = False, self.files.size(node_id)
            self._service.came_online(stored)
            return stored, True

    async def auto_resume(self, sandbox_id: str) -> bool:
        """For the proxy: resumes a paused sandbox created with autoResume; False if it may not."""
        with self._sessions() as session:
            row = session.get(SandboxRow, sandbox_id)
        if row is None or not (row.lifecycle or {}).get("autoResume"):
            return False
        try:
            await self.resume(row.key_id, sandbox_id, timeout=row.timeout_s)
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
        if self.is_template(name):
            raise ApiError(400, f"snapshot name {name!r} is the name of a template")

    async def snapshot(self, key_id: str, sandbox_id: str, *, name: str | None = None, memory: bool = True,
                       metadata: dict | None = None, kind: str = "snapshot", clones: int = 0) -> CheckpointRow:
        self._check_name(name)
        async with self._service.locks[sandbox_id]:
            row = self._service.get(key_id, sandbox_id)
            if row.state == "paused":
                # The pause checkpoint already is this state: share its files.
                node = self._record_node(row, kind, memory=row.pause_mode == "full", name=name, metadata=metadata,
                                         parent=row.paused_node)
                try:
                    await asyncio.to_thread(self.files.link_copy, row.paused_node, node.id)
                except BaseException:
                    self._drop_node(node.id)
                    raise
                return self._finish_node(node)
            node = self._record_node(row, kind, memory=memory, name=name, metadata=metadata)
            try:
                await self._orchestrator.checkpoint(sandbox_id, self.files.path(node.id), memory=memory,
                                                    clones=clones)
            except BaseException:
                self._drop_node(node.id)
                raise
            return self._finish_node(node, head_of=sandbox_id)

    async def fork(self, key_id: str, sandbox_id: str, *, count: int,
                   timeout: int | None) -> list[SandboxRow | ApiError]:
        if not 1 <= count <= MAX_FORKS:
            raise ApiError(400, f"count must be between 1 and {MAX_FORKS}, got {count}")
        row = self._service.get(key_id, sandbox_id)
        seconds = self._service.timeout_for(timeout)
        if row.state == "paused":
            # From the pause checkpoint itself; the lock keeps a resume from dropping its image meanwhile.
            async with self._service.locks[sandbox_id]:
                row = self._service.get(key_id, sandbox_id)
                if row.state == "paused":
                    node = self.node(key_id, row.paused_node)
                    return await self.start_from(node, count, timeout=seconds, metadata=row.sandbox_metadata or {},
                                                 env_vars=row.env_vars or {}, lifecycle=row.lifecycle or {},
                                                 internet=row.internet, template=row.template)
        began = time.perf_counter()
        node = await self.snapshot(key_id, sandbox_id, kind="fork", clones=count)
        snapshotted = time.perf_counter()
        results = await self.start_from(node, count, timeout=seconds, metadata=row.sandbox_metadata or {},
                                        env_vars=row.env_vars or {}, lifecycle=row.lifecycle or {},
                                        internet=row.internet, template=row.template)
        log.debug("fork of %s x%d: snapshot %.1f ms, starts %.1f ms", sandbox_id, count,
                  (snapshotted - began) * 1000, (time.perf_counter() - snapshotted) * 1000)
        return results

    async def start_from(self, node: CheckpointRow, count: int, *, timeout: int, metadata: dict,
                         env_vars: dict, lifecycle: dict, internet: bool,
                         template: str | None = None) -> list[SandboxRow | ApiError]:
        """`count` new sandboxes from a node, each succeeding or failing on its own."""
        self._in_use[node.id] += 1
        try:
            results = await asyncio.gather(*(
                self._start_one(node, timeout=timeout, metadata=metadata, env_vars=env_vars, lifecycle=lifecycle,
                                internet=internet, template=template or node.id) for _ in range(count)),
                return_exceptions=True)
        finally:
            self._in_use[node.id] -= 1
        return [_api_error(r) if isinstance(r, BaseException) else r for r in results]

    async def _start_one(self, node: CheckpointRow, *, timeout: int, metadata: dict, env_vars: dict,
                         lifecycle: dict, internet: bool, template: str) -> SandboxRow:
        token = secrets.token_urlsafe(24)
        api_id, sandbox = await self._orchestrator.start_from(
            self.files.snapshot(node.id), sandbox_id=None, token=token, current_token=node.envd_token,
            env_vars=env_vars, internet=internet, resources=_resources(node))
        row = SandboxRow(id=api_id, runtime_id=sandbox.id, key_id=node.key_id, template=template, envd_token=token,
                         sandbox_metadata=metadata, env_vars=env_vars, vcpus=node.vcpus, memory_mb=node.memory_mb,
                         disk_mb=node.disk_mb, internet=internet, lifecycle=lifecycle, head=node.id)
        return await self._service.register(row, timeout)

    # --- the tree --------------------------------------------------------------------------------

    def tree(self, key_id: str, ref: str) -> dict:
        """The whole lineage `ref` (a node or a sandbox) belongs to, from its root down."""
        nodes = {n.id: n for n in self._nodes(key_id)}
        start = self.find_node(key_id, ref)
        if start is None:
            with self._sessions() as session:
                sandbox = session.get(SandboxRow, ref)
            if sandbox is None or sandbox.key_id != key_id:
                raise ApiError(404, f"no checkpoint or sandbox {ref}")
            if sandbox.head is None or sandbox.head not in nodes:
                return {"roots": [], "totalBytes": 0}
            start = nodes[sandbox.head]
        root = start
        while root.parent_id in nodes:
            root = nodes[root.parent_id]
        children: dict[str | None, list[CheckpointRow]] = {}
        for n in nodes.values():
            children.setdefault(n.parent_id, []).append(n)
        with self._sessions() as session:
            sandboxes = list(session.scalars(select(SandboxRow).where(SandboxRow.key_id == key_id)))
        on_node: dict[str, list[dict]] = {}
        for s in sandboxes:
            at = s.paused_node if s.state == "paused" else s.head
            if at:
                on_node.setdefault(at, []).append({"sandboxID": s.id, "state": s.state})
        total = 0

        def build(n: CheckpointRow) -> dict:
            nonlocal total
            total += n.size_bytes
            return {**node_view(n), "sandboxes": on_node.get(n.id, []),
                    "children": [build(c) for c in children.get(n.id, [])]}

        return {"roots": [build(root)], "totalBytes": total}

    def set_metadata(self, key_id: str, ref: str, patch: dict) -> CheckpointRow:
        node = self.node(key_id, ref)
        with self._sessions.begin() as session:
            stored = session.get(CheckpointRow, node.id)
            merged = dict(stored.node_metadata or {})
            for k, v in patch.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            stored.node_metadata = merged
        return stored

    async def delete(self, key_id: str, ref: str, *, subtree: bool = False) -> dict:
        """Deletes a node (its children move up to its parent) or its whole subtree. Storage that running
        sandboxes or remaining nodes stand on is kept until they are gone; the rest is freed now."""
        node = self.node(key_id, ref)
        nodes = {n.id: n for n in self._nodes(key_id)}
        doomed = [node.id]
        if subtree:
            frontier = [node.id]
            while frontier:
                kids = [n.id for n in nodes.values() if n.parent_id in frontier]
                doomed += kids
                frontier = kids
        busy = [n for n in doomed if self._in_use[n]]
        if busy:
            raise ApiError(409, f"checkpoint {busy[0]} is in use: sandboxes are being started from it right now")
        with self._sessions() as session:
            holders = list(session.scalars(select(SandboxRow).where(SandboxRow.paused_node.in_(doomed))))
        if holders:
            raise ApiError(409, f"checkpoint {holders[0].paused_node} holds paused sandbox {holders[0].id}: "
                                "resume or kill it first")
        survivor = node.parent_id if node.parent_id not in doomed else None
        with self._sessions.begin() as session:
            for child in session.scalars(select(CheckpointRow).where(CheckpointRow.parent_id.in_(doomed))):
                if child.id not in doomed:
                    child.parent_id = survivor
            for sandbox in session.scalars(select(SandboxRow).where(SandboxRow.head.in_(doomed))):
                sandbox.head = survivor
            for node_id in doomed:
                if (stored := session.get(CheckpointRow, node_id)) is not None:
                    session.delete(stored)
        freed = self.reclaim()
        retained = sum(self.files.size(n) for n in doomed)
        return {"deleted": doomed, "reclaimedBytes": freed, "retainedBytes": retained}

    async def forget_sandbox(self, sandbox_id: str) -> None:
        """After a kill: its pause checkpoints go too, unless the tree hangs on them."""
        with self._sessions() as session:
            pause_ids = list(session.scalars(select(CheckpointRow.id).where(
                CheckpointRow.sandbox_id == sandbox_id, CheckpointRow.kind == "pause")))
        for node_id in pause_ids:  # a killed paused sandbox holds nothing ready to resume any more
            await self._orchestrator.release_prepared(self.files.path(node_id))
        with self._sessions.begin() as session:
            for node in session.scalars(select(CheckpointRow).where(CheckpointRow.id.in_(pause_ids))):
                has_children = session.scalars(select(CheckpointRow.id).where(
                    CheckpointRow.parent_id == node.id)).first() is not None
                has_sandboxes = session.scalars(select(SandboxRow.id).where(
                    SandboxRow.head == node.id)).first() is not None
                if not has_children and not has_sandboxes and not self._in_use[node.id]:
                    session.delete(node)
        self.reclaim()

    def reclaim(self, *, partials: bool = False) -> int:
        with self._sessions() as session:
            keep = set(session.scalars(select(CheckpointRow.id)))
        busy = {n for n, c in self._in_use.items() if c}
        return self.files.reclaim(keep, busy=busy, partials=partials)

    # --- after a restart -------------------------------------------------------------------------

    async def recover(self, rows: list[SandboxRow], live: set[str]) -> list[SandboxRow]:
        """Finishes or undoes pauses and checkpoints a killed server left half done; returns the rows as
        they are now."""
        with self._sessions.begin() as session:
            for node in session.scalars(select(CheckpointRow).where(CheckpointRow.ready.is_(False))):
                if self.files.complete(node.id):
                    node.ready, node.size_bytes = True, self.files.size(node.id)
                    node.memory = self.files.has_memory(node.id)
                else:
                    session.delete(node)
            for row in rows:
                stored = session.get(SandboxRow, row.id)
                if stored is None or stored.state != "paused" or not stored.runtime_id:
                    continue
                if self.files.complete(stored.paused_node):
                    stored.runtime_id = None  # the pause got written; its sandbox is destroyed below
                elif row.id in live:
                    stored.state, stored.paused_node, stored.pause_mode = "running", None, None
                else:
                    log.warning("sandbox %s was being paused when the server died and is lost", row.id)
                    stored.state = "lost"
        with self._sessions() as session:
            now = list(session.scalars(select(SandboxRow)))
        lost = [r.id for r in now if r.state == "lost"]
        if lost:
            self._service.forget(lost)
        for r in now:
            if r.state == "paused" and r.id in live:
                # Paused for good but its old container was adopted: it must not run twice.
                await self._orchestrator.kill(r.id)
                live.discard(r.id)
        return [r for r in now if r.state != "lost"]


def _resources(row) -> Resources:
    return Resources(vcpus=row.vcpus, memory_mb=row.memory_mb, disk_mb=row.disk_mb)


def node_view(n: CheckpointRow) -> dict:
    return {"id": n.id, "kind": n.kind, "parentID": n.parent_id, "sandboxID": n.sandbox_id, "template": n.template,
            "name": n.name, "metadata": n.node_metadata or {}, "memory": n.memory, "sizeBytes": n.size_bytes,
            "createdAt": n.created_at}
