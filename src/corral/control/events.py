"""Lifecycle and operations events of a team: recorded durably (table `events`), queryable, and handed to
listeners (the webhook deliveries, control/webhooks.py) once recorded.

Types follow E2B's lifecycle event names where E2B has one; the others are Corral's own."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from sqlalchemy import delete, select

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
BATCH_DELAY_S = 0.05


class Events:
    """Events are queued by whoever reports them and written in order, a batch per database unit, by one
    writer task, so a sandbox operation does not wait for its event's write (a create would pay a commit).
    Listeners get each event once it is written. Reading (`list`) first waits for what is queued."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._listeners: list[Listener] = []
        self._pending: list[EventRow] = []
        self._writer: asyncio.Task | None = None
        self._queued = self._written = 0  # events queued and written (or lost) so far
        self._progress = asyncio.Condition()  # notified as `_written` grows

    def subscribe(self, listener: Listener) -> None:
        """`listener(row)` is called (on the event loop, must not block) with each event once it is recorded."""
        self._listeners.append(listener)

    def record(self, team_id: str, type: str, *, sandbox_id: str | None = None,
               data: dict | None = None) -> EventRow:
        """Queues the event for writing and returns it (without its database id until written)."""
        if type not in TYPES:
            raise ValueError(f"unknown event type {type!r}")
        row = EventRow(event_id=str(uuid.uuid4()), team_id=team_id, sandbox_id=sandbox_id, type=type,
                       ts=time.time(), data=data or {})
        self._pending.append(row)
        self._queued += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return row

    async def emit(self, team_id: str, type: str, *, sandbox_id: str | None = None,
                   data: dict | None = None) -> EventRow:
        """`record`, and wait until it is written."""
        row = self.record(team_id, type, sandbox_id=sandbox_id, data=data)
        await self.settled()
        return row

    async def emit_quietly(self, team_id: str | None, type: str, **details) -> None:
        """`record`, for call sites where the event is a by-product of an operation that has happened: it
        does not wait for the write, and a failure is logged, not raised."""
        if not team_id:
            return
        try:
            self.record(team_id, type, **details)
        except Exception:
            log.exception("recording event %s failed", type)

    async def settled(self) -> None:
        """Returns once every event queued before the call is written (or its write failed and was logged);
        events queued meanwhile do not keep it waiting."""
        target = self._queued
        async with self._progress:
            await self._progress.wait_for(lambda: self._written >= target)

    def notify(self, rows: list[EventRow]) -> None:
        """Hands events someone else wrote (in their own transaction: metering's spending events) to the
        listeners."""
        for row in rows:
            for listener in self._listeners:
                try:
                    listener(row)
                except Exception:  # a listener's failure never fails what emitted the event
                    log.exception("event listener failed on %s", row.type)

    async def prune(self, keep_days: float) -> int:
        """Deletes events older than `keep_days`; how many."""
        before = time.time() - keep_days * 86400
        return await self._db.write(
            lambda session: session.execute(delete(EventRow).where(EventRow.ts < before)).rowcount or 0)

    async def _write(self) -> None:
        # Events come in bursts (a create, a fork of many, a kill): written a moment later in one unit, they
        # do not take the database's worker between the API's own units of work.
        await asyncio.sleep(BATCH_DELAY_S)
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._db.write(lambda session, batch=batch: session.add_all(batch))
                written = batch
            except Exception:
                log.exception("writing %d event(s) failed; they are lost", len(batch))
                written = []
            self._written += len(batch)  # written or lost: nobody waits for them any longer
            self.notify(written)
            async with self._progress:
                self._progress.notify_all()

    async def list(self, team_id: str, *, sandbox_id: str | None = None, types: list[str] | None = None,
                   since: float | None = None, limit: int = 100, offset: int = 0,
                   newest_first: bool = False) -> list[EventRow]:
        await self.settled()
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
