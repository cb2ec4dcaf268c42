"""Start-up: picks up where a previous server (even one killed with -9) left off. Sandboxes still running
are adopted and their timers armed again; records of sandboxes that no longer exist go; pauses and
checkpoints the old server left half done are finished or undone (the ordering they rely on is in
control/branching.py); checkpoint files nothing needs any more are removed."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from corral.control.db import CheckpointRow, SandboxRow
from corral.control.sandboxes import Sandboxes
from corral.control.tree import CheckpointTree
from corral.orchestrator.sandboxes import Orchestrator

log = logging.getLogger("corral.recovery")


async def recover(sessions: sessionmaker, orchestrator: Orchestrator, sandboxes: Sandboxes,
                  tree: CheckpointTree) -> None:
    with sessions() as session:
        rows = list(session.scalars(select(SandboxRow)))
    keep = {r.id: (r.runtime_id or r.id, r.envd_token) for r in rows if r.runtime_id or r.state == "running"}
    live = await orchestrator.start(keep=keep)
    rows = await _finish_checkpoints(sessions, orchestrator, sandboxes, tree, rows, live)
    gone = [r.id for r in rows if r.state == "running" and r.id not in live]
    if gone:
        log.warning("%d sandboxes from the database no longer exist: %s", len(gone), ", ".join(gone))
        sandboxes.forget(gone)
    for row in rows:
        if row.id in live:
            sandboxes.came_online(row)
    tree.reclaim(partials=True)


async def _finish_checkpoints(sessions: sessionmaker, orchestrator: Orchestrator, sandboxes: Sandboxes,
                              tree: CheckpointTree, rows: list[SandboxRow], live: set[str]) -> list[SandboxRow]:
    """Finishes or undoes pauses and checkpoints a killed server left half done; returns the rows as
    they are now."""
    files = tree.files
    with sessions.begin() as session:
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
    with sessions() as session:
        now = list(session.scalars(select(SandboxRow)))
    lost = [r.id for r in now if r.state == "lost"]
    if lost:
        sandboxes.forget(lost)
    for r in now:
        if r.state == "paused" and r.id in live:
            # Paused for good but its old container was adopted: it must not run twice.
            await orchestrator.kill(r.id)
            live.discard(r.id)
    return [r for r in now if r.state != "lost"]
