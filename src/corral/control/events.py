"""Lifecycle and operations events of a team: recorded durably (table `events`), queryable, and handed to
listeners (the webhook deliveries, control/webhooks.py) once recorded.

Types follow E2B's lifecycle event names where E2B has one; the others are Corral's own."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from sqlalchemy import select

from corral.control.db import Database, EventRow

log = logging.getLogger("corral.events")

CREATED = "sandbox.lifecycle.created"
KILLED = "sandbox.lifecycle.killed"  # data.reason: request, timeout, spending cap
UPDATED = "sandbox.lifecycle.updated"  # its timeout changed
PAUSED = "sandbox.lifecycle.paused"  # data.reason: request, timeout, idle, spending cap
RESUMED = "sandbox.lifecycle.resumed"
CHECKPOINTED = "sandbox.lifecycle.checkpointed"  # a snapshot was taken (data.snapshotID)
TIMED_OUT = "sandbox.lifecycle.timed_out"  # then killed or paused, as its lifecycle says
FORKED = "sandbox.lifecycle.forked"  # of the parent: data.children
OUT_OF_MEMORY = "sandbox.out_of_memory"
BUILD_FINISHED = "template.build.finished"
BUILD_FAILED = "template.build.failed"
SPENDING_WARNING = "team.spending.warning"  # data.percent, spent, budget
CAP_REACHED = "team.spending.cap_reached"

TYPES = (CREATED, KILLED, UPDATED, PAUSED, RESUMED, CHECKPOINTED, TIMED_OUT, FORKED, OUT_OF_MEMORY, BUILD_FINISHED,
         BUILD_FAILED, SPENDING_WARNING, CAP_REACHED)

Listener = Callable[[EventRow], None]


class Events:
    def __init__(self, database: Database) -> None:
        self._db = database
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """`listener(row)` is called (on the event loop, must not block) with each event once it is recorded."""
        self._listeners.append(listener)

    async def emit(self, team_id: str, type: str, *, sandbox_id: str | None = None,
                   data: dict | None = None) -> EventRow:
        if type not in TYPES:
            raise ValueError(f"unknown event type {type!r}")
        row = EventRow(event_id=str(uuid.uuid4()), team_id=team_id, sandbox_id=sandbox_id, type=type,
                       ts=time.time(), data=data or {})
        await self._db.write(lambda session: session.add(row))
        for listener in self._listeners:
            try:
                listener(row)
            except Exception:  # a listener's failure never fails what emitted the event
                log.exception("event listener failed on %s", row.type)
        return row

    async def emit_quietly(self, team_id: str | None, type: str, **details) -> None:
        """`emit`, for call sites where the event is a by-product: a failure to record it is logged, not
        raised (the sandbox operation it reports has already happened)."""
        if not team_id:
            return
        try:
            await self.emit(team_id, type, **details)
        except Exception:
            log.exception("recording event %s failed", type)

    async def list(self, team_id: str, *, sandbox_id: str | None = None, types: list[str] | None = None,
                   since: float | None = None, limit: int = 100, offset: int = 0,
                   newest_first: bool = False) -> list[EventRow]:
        stmt = select(EventRow).where(EventRow.team_id == team_id)
        if sandbox_id is not None:
            stmt = stmt.where(EventRow.sandbox_id == sandbox_id)
        if types:
            stmt = stmt.where(EventRow.type.in_(types))
        if since is not None:
            stmt = stmt.where(EventRow.ts >= since)
        order = (EventRow.ts.desc(), EventRow.id.desc()) if newest_first else (EventRow.ts, EventRow.id)
        stmt = stmt.order_by(*order).offset(offset).limit(limit)
        return await self._db.read(lambda session: list(session.scalars(stmt)))
