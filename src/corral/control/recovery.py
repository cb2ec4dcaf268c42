"""Start-up: picks up where a previous server (even one killed with -9) left off. Sandboxes still running
are adopted and their timers armed again; records of sandboxes that no longer exist go; pauses and
checkpoints the old server left half done are finished or undone (the ordering they rely on is in
control/branching.py); checkpoint files nothing needs any more are removed."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.control.db import CheckpointRow, Database, SandboxRow
from corral.control.sandboxes import Sandboxes
from corral.control.tree import CheckpointTree
from corral.orchestrator.sandboxes import Orchestrator

log = logging.getLogger("corral.recovery")


async def recover(database: Database, orchestrator: Orchestrator, sandboxes: Sandboxes,
                  tree: CheckpointTree) -> None:
    rows = await database.read(_all_sandboxes)
    keep = {r.id: (r.runtime_id or r.id, r.envd_token) for r in rows if r.runtime_id or r.state == "running"}
    live = await orchestrator.start(keep=keep)
    rows = await _finish_checkpoints(database, orchestrator, sandboxes, tree, rows, live)
    gone = [r.id for r in rows if r.state == "running" and r.id not in live]
    if gone:
        log.warning("%d sandboxes from the database no longer exist: %s", len(gone), ", ".join(gone))
        await sandboxes.forget(gone, meter=False)  # when they ended is unknown: metered to their last flush
    for row in rows:
        if row.id in live:
            sandboxes.came_online(row)
    await tree.reclaim(partials=True)


def _all_sandboxes(session: Session) -> list[SandboxRow]:
    return list(session.scalars(select(SandboxRow)))


async def _finish_checkpoints(database: Database, orchestrator: Orchestrator, sandboxes: Sandboxes,
                              tree: CheckpointTree, rows: list[SandboxRow], live: set[str]) -> list[SandboxRow]:
    """Finishes or undoes pauses and checkpoints a killed server left half done; returns the rows as
    they are now."""
    files = tree.files

    def finish(session: Session) -> None:  # reads checkpoint files too: fine in the database's thread
        for node in session.scalars(select(CheckpointRow).where(CheckpointRow.ready.is_(False))):
            if files.complete(node.id):
                node.ready, node.size_bytes = True, files.size(node.id)
                node.memory = files.has_memory(node.id)
            else:
                session.delete(node)
        for row in rows:
            stored = session.get(SandboxRow, row.id)
            if stored is None or stored.state != "paused" or not stored.runtime_id:
                continue
            if files.complete(stored.paused_node):
                stored.runtime_id = None  # the pause got written; its sandbox is destroyed below
            elif row.id in live:
                stored.state, stored.paused_node, stored.pause_mode = "running", None, None
            else:
                log.warning("sandbox %s was being paused when the server died and is lost", row.id)
                stored.state = "lost"

    await database.write(finish)
    now = await database.read(_all_sandboxes)
    lost = [r.id for r in now if r.state == "lost"]
    if lost:
        await sandboxes.forget(lost)
    for r in now:
        if r.state == "paused" and r.id in live:
            # Paused for good but its old container was adopted: it must not run twice.
            await orchestrator.kill(r.id)
            live.discard(r.id)
    return [r for r in now if r.state != "lost"]
