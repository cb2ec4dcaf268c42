"""The checkpoint tree: its nodes (CheckpointRow), how a node is found, the lineage views, deleting nodes
and giving back the disk space nothing needs any more.

Every snapshot, pause and fork point is a node whose parent is the node the sandbox's state descended
from (`SandboxRow.head`): a sandbox started from a template has no head, a sandbox started from a node
has that node, and each checkpoint taken of a sandbox becomes its new head. A lineage is the tree of
nodes reachable from one root. A node is recorded (not ready) before its files are written and marked
ready after (control/branching.py takes the checkpoints; control/recovery.py finishes what a killed
server left between the two)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import string
import time
from collections import Counter

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.control.db import CheckpointRow, Database, SandboxRow
from corral.control.errors import ApiError
from corral.control.keys import Owner
from corral.control.metering import settle_checkpoint
from corral.orchestrator.checkpoints import CheckpointFiles
from corral.orchestrator.sandboxes import Orchestrator

_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_node_id() -> str:
    return "n" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(19))


def node_view(n: CheckpointRow) -> dict:
    return {"id": n.id, "kind": n.kind, "parentID": n.parent_id, "sandboxID": n.sandbox_id, "template": n.template,
            "name": n.name, "metadata": n.node_metadata or {}, "memory": n.memory, "sizeBytes": n.size_bytes,
            "createdAt": n.created_at}


class CheckpointTree:
    def __init__(self, database: Database, files: CheckpointFiles, orchestrator: Orchestrator) -> None:
        self._db = database
        self.files = files
        self._orchestrator = orchestrator
        self._in_use: Counter[str] = Counter()  # nodes being read by a restore right now

    @contextlib.contextmanager
    def reading(self, node_id: str):
        """Around a restore from the node: its files stay, even if the node is deleted meanwhile."""
        self._in_use[node_id] += 1
        try:
            yield
        finally:
            self._in_use[node_id] -= 1

    # --- lookups ---------------------------------------------------------------------------------

    async def _nodes(self, owner: Owner) -> list[CheckpointRow]:
        stmt = select(CheckpointRow).where(CheckpointRow.team_id == owner.team_id, CheckpointRow.ready.is_(True))
        return await self._db.read(
            lambda session: list(session.scalars(stmt.order_by(CheckpointRow.created_at, CheckpointRow.id))))

    async def find_node(self, owner: Owner, ref: str) -> CheckpointRow | None:
        """The node `ref` names: its id or (the latest node with) its name."""
        def find(session: Session) -> CheckpointRow | None:
            node = session.get(CheckpointRow, ref)
            if node is not None and node.team_id == owner.team_id and node.ready:
                return node
            stmt = select(CheckpointRow).where(CheckpointRow.team_id == owner.team_id, CheckpointRow.name == ref,
                                               CheckpointRow.ready.is_(True))
            return session.scalars(stmt.order_by(CheckpointRow.created_at.desc())).first()

        return await self._db.read(find)

    async def node(self, owner: Owner, ref: str) -> CheckpointRow:
        node = await self.find_node(owner, ref)
        if node is None:
            raise ApiError(404, f"checkpoint {ref} not found")
        return node

    async def list_nodes(self, owner: Owner, *, sandbox_id: str | None = None, name: str | None = None,
                         kinds: set[str] | None = None) -> list[CheckpointRow]:
        nodes = await self._nodes(owner)
        return [n for n in reversed(nodes)
                if (sandbox_id is None or n.sandbox_id == sandbox_id)
                and (name is None or name in (n.name, n.id))
                and (kinds is None or n.kind in kinds)]

    async def tree(self, owner: Owner, ref: str) -> dict:
        """The whole lineage `ref` (a node or a sandbox) belongs to, from its root down."""
        nodes = {n.id: n for n in await self._nodes(owner)}
        start = await self.find_node(owner, ref)
        if start is None:
            sandbox = await self._db.read(lambda session: session.get(SandboxRow, ref))
            if sandbox is None or sandbox.team_id != owner.team_id:
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
        sandboxes = await self._db.read(
            lambda session: list(session.scalars(select(SandboxRow).where(SandboxRow.team_id == owner.team_id))))
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

    # --- recording nodes -------------------------------------------------------------------------

    async def record(self, row: SandboxRow, kind: str, *, memory: bool, name: str | None = None,
                     metadata: dict | None = None, parent: str | None = None) -> CheckpointRow:
        """A node of `row`'s state, not ready yet: its files are about to be written."""
        node = CheckpointRow(id=new_node_id(), key_id=row.key_id, team_id=row.team_id,
                             kind=kind, parent_id=parent or row.head,
                             sandbox_id=row.id, template=row.template, name=name, node_metadata=metadata or {},
                             env_vars=row.env_vars or {}, envd_token=row.envd_token, memory=memory,
                             vcpus=row.vcpus, memory_mb=row.memory_mb, disk_mb=row.disk_mb, internet=row.internet,
                             created_at=time.time(), ready=False, volume_mounts=row.volume_mounts)
        await self._db.write(lambda session: session.add(node))
        return node

    def _measure(self, node_id: str) -> tuple[bool, int]:
        """Whether the node's snapshot holds memory, and its size (a walk of its files: run in a thread)."""
        return self.files.has_memory(node_id), self.files.size(node_id)

    async def mark_ready(self, node: CheckpointRow, *, head_of: str | None = None) -> CheckpointRow:
        """Its files are written: the node is listed and restorable, and the head of sandbox `head_of`."""
        memory, size = await asyncio.to_thread(self._measure, node.id)

        def mark(session: Session) -> CheckpointRow:
            stored = session.get(CheckpointRow, node.id)
            stored.ready, stored.memory, stored.size_bytes = True, memory, size
            if stored.name:  # a name moves to its newest snapshot
                for other in session.scalars(select(CheckpointRow).where(
                        CheckpointRow.team_id == node.team_id, CheckpointRow.name == stored.name,
                        CheckpointRow.id != node.id)):
                    other.name = None
            if head_of is not None and (sandbox := session.get(SandboxRow, head_of)) is not None:
                sandbox.head = node.id
            return stored

        return await self._db.write(mark)

    async def drop(self, node_id: str) -> None:
        """A node whose files could not be written."""
        def drop(session: Session) -> None:
            if (stored := session.get(CheckpointRow, node_id)) is not None:
                session.delete(stored)

        await self._db.write(drop)

    async def drop_memory(self, node_id: str) -> None:
        """Deletes the node's memory image (its sandbox resumed and ran on): it is filesystem-only now."""
        def drop_and_measure() -> int:
            self.files.drop_memory(node_id)
            return self.files.size(node_id)

        size = await asyncio.to_thread(drop_and_measure)

        def mark(session: Session) -> None:
            if (stored := session.get(CheckpointRow, node_id)) is not None:
                stored.memory, stored.size_bytes = False, size

        await self._db.write(mark)

    async def set_metadata(self, owner: Owner, ref: str, patch: dict) -> CheckpointRow:
        node = await self.node(owner, ref)

        def merge(session: Session) -> CheckpointRow:
            stored = session.get(CheckpointRow, node.id)
            merged = dict(stored.node_metadata or {})
            for k, v in patch.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            stored.node_metadata = merged
            return stored

        return await self._db.write(merge)

    # --- deleting and reclaiming -----------------------------------------------------------------

    async def delete(self, owner: Owner, ref: str, *, subtree: bool = False) -> dict:
        """Deletes a node (its children move up to its parent) or its whole subtree. Storage that running
        sandboxes or remaining nodes stand on is kept until they are gone; the rest is freed now."""
        node = await self.node(owner, ref)
        nodes = {n.id: n for n in await self._nodes(owner)}
        doomed = [node.id]
        if subtree:
            frontier = [node.id]
            while frontier:
                kids = [n.id for n in nodes.values() if n.parent_id in frontier]
                doomed += kids
                frontier = kids
        survivor = node.parent_id if node.parent_id not in doomed else None

        def delete(session: Session) -> None:
            # Checked in the unit that deletes, so no pause can take one of these nodes in between.
            holder = session.scalars(select(SandboxRow).where(SandboxRow.paused_node.in_(doomed))).first()
            if holder is not None:
                raise ApiError(409, f"checkpoint {holder.paused_node} holds paused sandbox {holder.id}: "
                                    "resume or kill it first")
            for child in session.scalars(select(CheckpointRow).where(CheckpointRow.parent_id.in_(doomed))):
                if child.id not in doomed:
                    child.parent_id = survivor
            for sandbox in session.scalars(select(SandboxRow).where(SandboxRow.head.in_(doomed))):
                sandbox.head = survivor
            for node_id in doomed:
                if (stored := session.get(CheckpointRow, node_id)) is not None:
                    if stored.ready:
                        settle_checkpoint(session, stored, time.time())
                    session.delete(stored)

        busy = [n for n in doomed if self._in_use[n]]
        if busy:
            raise ApiError(409, f"checkpoint {busy[0]} is in use: sandboxes are being started from it right now")
        await self._db.write(delete)
        freed = await self.reclaim()
        retained = sum(await asyncio.to_thread(lambda: [self.files.size(n) for n in doomed]))
        return {"deleted": doomed, "reclaimedBytes": freed, "retainedBytes": retained}

    async def forget_sandbox(self, sandbox_id: str) -> None:
        """After a kill: its pause checkpoints go too, unless the tree hangs on them."""
        pause_ids = await self._db.read(lambda session: list(session.scalars(select(CheckpointRow.id).where(
            CheckpointRow.sandbox_id == sandbox_id, CheckpointRow.kind == "pause"))))
        for node_id in pause_ids:  # a killed paused sandbox holds nothing ready to resume any more
            await self._orchestrator.release_prepared(self.files.path(node_id))
        in_use = {n for n in pause_ids if self._in_use[n]}

        def forget(session: Session) -> None:
            for node in session.scalars(select(CheckpointRow).where(CheckpointRow.id.in_(pause_ids))):
                has_children = session.scalars(select(CheckpointRow.id).where(
                    CheckpointRow.parent_id == node.id)).first() is not None
                has_sandboxes = session.scalars(select(SandboxRow.id).where(
                    SandboxRow.head == node.id)).first() is not None
                if not has_children and not has_sandboxes and node.id not in in_use:
                    if node.ready:
                        settle_checkpoint(session, node, time.time())
                    session.delete(node)

        await self._db.write(forget)
        await self.reclaim()

    async def reclaim(self, *, partials: bool = False) -> int:
        """Removes the files of nodes no longer recorded. A node being recorded meanwhile is safe: either
        its record ran before this read (it is kept), or its files are written only after the record
        returns, which is after this coroutine has gone on (units of work finish in order)."""
        keep = set(await self._db.read(lambda session: list(session.scalars(select(CheckpointRow.id)))))
        busy = {n for n, c in self._in_use.items() if c}
        return await self.files.reclaim(keep, busy=busy, partials=partials)
