"""Sandboxes as the API sees them: ownership, metadata, timeouts that end them on time, metric history.

Sandboxes started from a checkpoint, pausing on timeout and a killed sandbox's pause checkpoints belong to
branching, which builds on this module; what this module needs of it is `CheckpointHooks`, handed in by
control/plane.py, so nothing here imports branching."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from corral.config import PlatformSettings
from corral.control import events
from corral.control.db import Database, MetricRow, SandboxRow
from corral.control.errors import ApiError, not_found
from corral.control.events import Events
from corral.control.keys import Owner, check_resources, check_timeout, owner_of
from corral.control.metering import settle_sandbox
from corral.control.network import Egress, Ingress, egress_from, refuse_egress_options
from corral.control.quotas import Admission
from corral.control.volumes import Volumes
from corral.observability.metrics import UNSCRAPED, ServerMetrics
from corral.orchestrator.envd_link import EnvdUnavailable
from corral.orchestrator.sandboxes import Orchestrator
from corral.runtime.base import Resources, VolumeMount

log = logging.getLogger("corral.sandboxes")


@dataclass(frozen=True)
class ListQuery:
    metadata: dict[str, str]
    states: set[str]
    order: str = "desc"
    started_after: float | None = None
    template: str | None = None


class CheckpointHooks(Protocol):
    """What sandboxes need from checkpoints (control/branching.py provides it)."""

    async def start_from_snapshot(self, owner: Owner, ref: str, *, timeout: int, metadata: dict[str, str],
                                  env_vars: dict[str, str], internet: bool, lifecycle: dict,
                                  ingress: Ingress | None = None, egress: Egress | None = None,
                                  volume_mounts: list[dict] | None = None) -> SandboxRow | None:
        """A new sandbox from the snapshot `ref` names; None when it names none (it is a template).
        `volume_mounts`: asked for by the create (a snapshot mounts its own; asking for others is refused)."""

    async def snapshot_resources(self, owner: Owner, ref: str) -> Resources | None:
        """The resources of the sandboxes the snapshot `ref` names would start; None when it names none."""

    async def pause(self, owner: Owner, sandbox_id: str, *, memory: bool, reason: str) -> None:
        """Pauses a running sandbox (ApiError 409 if it is paused already)."""

    async def forget_sandbox(self, sandbox_id: str) -> None:
        """The sandbox was killed: what it alone held in the checkpoint tree goes."""


class RecordingHooks(Protocol):
    """What sandboxes and branching need from recordings (control/recordings.py provides it)."""

    async def sandbox_ending(self, sandbox_id: str) -> None:
        """Before a sandbox is destroyed: its recordings are collected or dropped."""

    async def recording(self, sandbox_id: str) -> bool:
        """Whether a recording of it is running."""

    async def drop_inherited(self, sandbox_id: str) -> None:
        """A fork's copy of its source's recorder is ended."""


class NoCheckpoints:
    """Sandboxes without branching: templates only, and a timeout always kills."""

    async def start_from_snapshot(self, owner: Owner, ref: str, **_) -> SandboxRow | None:
        return None

    async def snapshot_resources(self, owner: Owner, ref: str) -> Resources | None:
        return None

    async def pause(self, owner: Owner, sandbox_id: str, *, memory: bool, reason: str) -> None:
        raise ApiError(501, "this server cannot pause sandboxes")

    async def forget_sandbox(self, sandbox_id: str) -> None:
        return None


class Sandboxes:
    def __init__(self, database: Database, orchestrator: Orchestrator, settings: PlatformSettings) -> None:
        self._db = database
        self.orchestrator = orchestrator
        self._settings = settings
        self.checkpoints: CheckpointHooks = NoCheckpoints()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._sampler: asyncio.Task | None = None
        # One state change at a time per sandbox: kill, pause, resume, snapshot and fork take this lock.
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Each recorded sandbox's ingress options, read by the proxy on every request: kept from its
        # record (loaded on first use, e.g. after a restart), dropped with it.
        self._ingress: dict[str, Ingress] = {}
        self.admission = Admission(database)  # key limits and team quotas (control/quotas.py)
        self.events: Events | None = None  # lifecycle events (control/events.py), set by control/plane.py
        self.volumes: Volumes | None = None  # a server without volumes refuses volumeMounts
        self.recordings: RecordingHooks | None = None  # control/recordings.py
        # The server's Prometheus metrics, handed in by control/plane.py (`metrics()` is a sandbox's samples).
        self.server_metrics: ServerMetrics = UNSCRAPED

    def start_sampling(self) -> None:
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in [self._sampler, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # --- create, read, kill ----------------------------------------------------------------------

    def timeout_for(self, requested: int | None) -> int:
        """Seconds a sandbox gets: the request, or the default, within this server's maximum."""
        timeout = self._settings.default_timeout_s if requested is None else requested
        maximum = self._settings.max_timeout_s
        if maximum and timeout > maximum:
            raise ApiError(400, f"timeout {timeout}s is above this server's maximum of {maximum}s")
        return timeout

    async def create(self, owner: Owner, template: str, **options) -> SandboxRow:
        """A new sandbox of `template` (or from a snapshot of that name), within the key's limits and the
        team's quota; its time and outcome are metered."""
        started = time.perf_counter()
        try:
            seconds = self.timeout_for(options.get("timeout"))
            check_timeout(owner.limits, seconds)
            # A snapshot's name starts sandboxes of the snapshot's size, a template's of the template's.
            resources = (await self.checkpoints.snapshot_resources(owner, template)
                         or self.orchestrator.resources_for(template))
            check_resources(owner.limits, template, resources)
            async with self.admission.starting(owner, resources, timeout_s=seconds):
                row = await self._create(owner, template, **options)
        except Exception:
            self.server_metrics.created(owner.key_id, None)
            raise
        self.server_metrics.created(owner.key_id, time.perf_counter() - started)
        return row

    async def _create(self, owner: Owner, template: str, *, timeout: int | None, metadata: dict[str, str],
                      env_vars: dict[str, str], internet: bool, lifecycle: dict,
                      ingress: Ingress | None = None, egress: Egress | None = None,
                      volume_mounts: list[dict] | None = None) -> SandboxRow:
        """`volume_mounts`: [{"name", "path"}] as the API received them."""
        seconds = self.timeout_for(timeout)
        ingress, egress = ingress or Ingress(), egress or Egress()
        if volume_mounts and self.volumes is None:
            raise ApiError(400, "this server keeps no volumes")
        mounts = await self.volumes.resolve_mounts(owner, volume_mounts) if volume_mounts else []
        row = await self.checkpoints.start_from_snapshot(owner, template, timeout=seconds, metadata=metadata,
                                                         env_vars=env_vars, internet=internet, lifecycle=lifecycle,
                                                         ingress=ingress, egress=egress, volume_mounts=mounts)
        if row is not None:
            return row
        token = secrets.token_urlsafe(24)
        async with self.attaching(mounts) as volumes:
            sandbox = await self.orchestrator.create(template, token=token, env_vars=env_vars, internet=internet,
                                                     allow_out=egress.allow, deny_out=egress.deny,
                                                     allow_domains=egress.domains, header_rules=egress.rules,
                                                     volumes=volumes)
            resources: Resources = sandbox.config.resources
            row = SandboxRow(id=sandbox.id, runtime_id=sandbox.id, key_id=owner.key_id, team_id=owner.team_id,
                             template=template,
                             envd_token=token, sandbox_metadata=metadata, env_vars=env_vars, vcpus=resources.vcpus,
                             memory_mb=resources.memory_mb, disk_mb=resources.disk_mb, internet=internet,
                             lifecycle=lifecycle, ingress=ingress.to_record(), egress=egress.to_record(),
                             volume_mounts=mounts or None)
            return await self.register(row, seconds)

    @contextlib.asynccontextmanager
    async def attaching(self, mounts: list[dict] | None):
        """Around starting a sandbox that mounts `mounts` (recorded [{"id", "name", "path"}]) until it is
        registered: yields what the runtime mounts; the volumes cannot be deleted meanwhile (409 if one was
        deleted already)."""
        if not mounts:
            yield ()
            return
        if self.volumes is None:
            raise ApiError(409, "this sandbox mounts volumes but this server keeps no volumes")
        async with self.volumes.attaching(mounts):
            runtime_mounts: tuple[VolumeMount, ...] = await self.volumes.runtime_mounts(mounts)
            yield runtime_mounts

    async def register(self, row: SandboxRow, seconds: int) -> SandboxRow:
        """Records a sandbox that is already running (its id live in the orchestrator) and arms its timer;
        if the record cannot be written the sandbox is killed, never left running unaccounted."""
        now = time.time()
        row.started_at, row.end_at, row.timeout_s, row.state = now, now + seconds, seconds, "running"
        try:
            await self._db.write(lambda session: session.add(row))
        except BaseException as e:
            await self.orchestrator.kill(row.id)
            if isinstance(e, asyncio.CancelledError):  # the write may have run all the same: undo it after
                with contextlib.suppress(Exception):
                    await self.forget([row.id])
            raise
        self._arm(row.id, row.end_at)
        self._ingress[row.id] = Ingress.from_record(row.ingress)
        await self.announce(row, events.CREATED, templateID=row.template, keyID=row.key_id,
                            **({"fromCheckpoint": row.head} if row.head else {}))
        return row

    async def announce(self, row: SandboxRow, type: str, **data) -> None:
        """Records a lifecycle event of the sandbox (control/events.py), never failing the caller."""
        await self.announce_of(row.team_id or row.key_id, row.id, type, **data)

    async def announce_of(self, team_id: str, sandbox_id: str, type: str, **data) -> None:
        if self.events is not None:
            await self.events.emit_quietly(team_id, type, sandbox_id=sandbox_id, data=data)

    async def ingress(self, sandbox_id: str) -> Ingress | None:
        """How the proxy treats requests to the sandbox's ports; None when there is no such sandbox."""
        known = self._ingress.get(sandbox_id)
        if known is None:
            row = await self.row(sandbox_id)
            if row is None:
                return None
            known = self._ingress[sandbox_id] = Ingress.from_record(row.ingress)
        return known

    async def update_network(self, owner: Owner, sandbox_id: str, network: dict) -> None:
        """`PUT /sandboxes/{id}/network`: a full replacement of the egress options (what is left out is
        cleared: `{}` allows everything again), applied to the running sandbox's next connections and
        kept for its resumes. Validated whole before anything changes."""
        if not isinstance(network, dict):
            raise ApiError(400, "the network update must be an object")
        refuse_egress_options(network)
        egress = egress_from(network)
        internet = network.get("allow_internet_access")
        if internet is not None and not isinstance(internet, bool):
            raise ApiError(400, "allow_internet_access must be a boolean")
        internet = internet is not False
        async with self.locks[sandbox_id]:
            row = await self.get(owner, sandbox_id)
            if row.state == "running":
                await self.orchestrator.set_egress(sandbox_id, internet=internet, allow_out=egress.allow,
                                                   deny_out=egress.deny, allow_domains=egress.domains,
                                                   header_rules=egress.rules)

            def store(session: Session) -> None:
                stored = session.get(SandboxRow, sandbox_id)
                if stored is not None:
                    stored.internet, stored.egress = internet, egress.to_record()

            await self._db.write(store)

    async def row(self, sandbox_id: str) -> SandboxRow | None:
        """The sandbox's record, whoever owns it; None when there is none."""
        return await self._db.read(lambda session: session.get(SandboxRow, sandbox_id))

    async def get(self, owner: Owner, sandbox_id: str) -> SandboxRow:
        """The owner's sandbox, for any of the per-sandbox API calls (which count as interest in it)."""
        row = await self.row(sandbox_id)
        if row is None or row.team_id != owner.team_id:
            raise not_found(sandbox_id)
        self.orchestrator.noticed(sandbox_id)
        return row

    async def list(self, owner: Owner, query: ListQuery) -> list[SandboxRow]:
        stmt = select(SandboxRow).where(SandboxRow.team_id == owner.team_id)
        if query.started_after is not None:
            stmt = stmt.where(SandboxRow.started_at >= query.started_after)  # "at or after"
        if query.template:
            stmt = stmt.where(SandboxRow.template == query.template)
        order = SandboxRow.started_at.asc() if query.order == "asc" else SandboxRow.started_at.desc()
        rows = await self._db.read(lambda session: list(session.scalars(stmt.order_by(order, SandboxRow.id))))
        return [r for r in rows if r.state in query.states
                and all((r.sandbox_metadata or {}).get(k) == v for k, v in query.metadata.items())]

    async def count_by_state_and_template(self) -> dict[tuple[str, str], int]:
        """How many sandboxes are running and paused, per template ID (as the API shows it), for /metrics."""
        stmt = select(SandboxRow.state, SandboxRow.template, func.count()).group_by(SandboxRow.state,
                                                                                    SandboxRow.template)
        counts: dict[tuple[str, str], int] = {}
        for state, template, count in await self._db.read(lambda session: list(session.execute(stmt))):
            key = (state, template.partition(":")[0])
            counts[key] = counts.get(key, 0) + count
        return counts

    async def kill(self, owner: Owner, sandbox_id: str) -> None:
        await self.get(owner, sandbox_id)
        await self._kill(sandbox_id)

    async def _kill(self, sandbox_id: str, reason: str = "request") -> None:
        async with self.locks[sandbox_id]:
            if (row := await self.row(sandbox_id)) is None:
                return  # killed while we waited for the lock
            # Gone for the API and the proxy at once; the runtime's teardown (about a second) follows.
            self._disarm(sandbox_id)
            if self.recordings is not None:  # a kept recording still running is collected first
                await self.recordings.sandbox_ending(sandbox_id)
            await self.forget([sandbox_id])
            await self.orchestrator.kill(sandbox_id)
            await self.checkpoints.forget_sandbox(sandbox_id)
        self.locks.pop(sandbox_id, None)
        await self.announce(row, events.KILLED, reason=reason)

    def went_offline(self, sandbox_id: str) -> None:
        """Paused: no timer (the registry no longer lists it, so signed file URLs no longer lead to it)."""
        self._disarm(sandbox_id)

    def came_online(self, row: SandboxRow) -> None:
        """Running (again, after a resume or a restart of the server): its timer counts to `row.end_at`."""
        self._arm(row.id, row.end_at)

    async def forget(self, ids: list[str], *, meter: bool = True) -> None:
        """Drops the sandboxes' records; a running one's usage is recorded up to now first, in the same
        transaction (`meter=False`: only up to its last flush, for sandboxes whose end is unknown)."""
        for sandbox_id in ids:
            self._ingress.pop(sandbox_id, None)

        def forget(session: Session) -> None:
            if meter:
                now = time.time()
                for row in session.scalars(select(SandboxRow).where(SandboxRow.id.in_(ids),
                                                                    SandboxRow.state == "running")):
                    settle_sandbox(session, row, now)
            session.execute(delete(SandboxRow).where(SandboxRow.id.in_(ids)))
            session.execute(delete(MetricRow).where(MetricRow.sandbox_id.in_(ids)))

        await self._db.write(forget)

    def sandbox_for_signature(self, path: str, operation: str, username: str, signature: str,
                              expiration: str | None) -> str | None:
        """Signed file URLs carry no routing headers (they are made for browsers): the sandbox is the one
        whose token produced the signature."""
        raw_suffix = f":{expiration}" if expiration else ""
        for entry in self.orchestrator.registry.entries():
            digest = hashlib.sha256(f"{path}:{operation}:{username}:{entry.token}{raw_suffix}".encode()).digest()
            expected = "v1_" + base64.b64encode(digest).rstrip(b"=").decode()
            if hmac.compare_digest(expected, signature):
                return entry.api_id
        return None

    # --- timeouts --------------------------------------------------------------------------------

    async def set_timeout(self, owner: Owner, sandbox_id: str, timeout: int) -> SandboxRow:
        """The sandbox now ends `timeout` seconds from now (sooner or later than before)."""
        row = await self.get(owner, sandbox_id)
        seconds = self.timeout_for(timeout)
        self.admission.check_lifetime(owner, time.time() + seconds - row.started_at)
        self.admission.check_extension(owner, row.end_at, time.time() + seconds)
        updated = await self._set_end(sandbox_id, lambda row: time.time() + seconds)
        await self.announce(updated, events.UPDATED, timeout=seconds)
        return updated

    async def extend(self, owner: Owner, sandbox_id: str, timeout: int | None) -> SandboxRow:
        """Connect: the sandbox lives at least `timeout` more seconds; a later end stays."""
        row = await self.get(owner, sandbox_id)
        seconds = self.timeout_for(timeout)
        self.admission.check_lifetime(owner, max(row.end_at, time.time() + seconds) - row.started_at)
        if self.admission.capped(owner):  # a connect still connects, but no longer extends
            return row
        return await self._set_end(sandbox_id, lambda row: max(row.end_at, time.time() + seconds))

    async def _set_end(self, sandbox_id: str, end_at: Callable[[SandboxRow], float]) -> SandboxRow:
        """Sets the sandbox's end to `end_at(row)`, reading and writing the row in one unit of work."""
        def set_end(session: Session) -> SandboxRow:
            row = session.get(SandboxRow, sandbox_id)
            if row is None:
                raise not_found(sandbox_id)
            row.end_at = end_at(row)
            row.timeout_s = max(0, round(row.end_at - time.time()))
            return row

        row = await self._db.write(set_end)
        if row.state == "running":  # a paused sandbox does not run out; its new end counts from resume
            self._arm(sandbox_id, row.end_at)
        return row

    def _disarm(self, sandbox_id: str) -> None:
        handle = self._timers.pop(sandbox_id, None)
        if handle is not None:
            handle.cancel()

    def _arm(self, sandbox_id: str, end_at: float) -> None:
        self._disarm(sandbox_id)
        loop = asyncio.get_running_loop()
        delay = max(0.0, end_at - time.time())
        self._timers[sandbox_id] = loop.call_at(loop.time() + delay, self._expire, sandbox_id)

    def _expire(self, sandbox_id: str) -> None:
        self._timers.pop(sandbox_id, None)
        task = asyncio.get_running_loop().create_task(self._on_timeout(sandbox_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_timeout(self, sandbox_id: str) -> None:
        row = await self.row(sandbox_id)
        lifecycle = (row.lifecycle or {}) if row else {}
        if row is not None:
            await self.announce(row, events.TIMED_OUT, then=lifecycle.get("onTimeout", "kill"))
        if row is not None and lifecycle.get("onTimeout") == "pause":
            try:
                await self.checkpoints.pause(owner_of(row), sandbox_id, memory=lifecycle.get("autoPauseMemory", True),
                                             reason="timeout")
                return
            except ApiError as e:
                if e.status == 409:
                    return  # paused already
                log.warning("auto-pause of %s failed (%s); killing it instead", sandbox_id, e.message)
            except Exception:
                log.exception("auto-pause of %s failed; killing it instead", sandbox_id)
        await self._kill(sandbox_id, reason="timeout")

    # --- metrics ---------------------------------------------------------------------------------

    async def metrics(self, owner: Owner, sandbox_id: str, start: float | None,
                      end: float | None) -> list[MetricRow]:
        await self.get(owner, sandbox_id)
        stmt = select(MetricRow).where(MetricRow.sandbox_id == sandbox_id)
        if start is not None:
            stmt = stmt.where(MetricRow.ts >= start)
        if end is not None:
            stmt = stmt.where(MetricRow.ts <= end)
        return await self._db.read(lambda session: list(session.scalars(stmt.order_by(MetricRow.ts))))

    async def recent_metrics(self, owner: Owner, sandbox_ids: list[str], since: float
                             ) -> dict[str, list[tuple[float, float, int, int, int]]]:
        """(ts, cpu_used_pct, mem_used, mem_total, cpu_count) of each sample since `since` of those of the
        sandboxes that are the owner's team's, oldest first, in one query of plain rows (the dashboard's table
        draws them for every listed sandbox, so no ORM objects)."""
        if not sandbox_ids:
            return {}
        stmt = (select(MetricRow.sandbox_id, MetricRow.ts, MetricRow.cpu_used_pct, MetricRow.mem_used,
                       MetricRow.mem_total, MetricRow.cpu_count)
                .join(SandboxRow, SandboxRow.id == MetricRow.sandbox_id)
                .where(SandboxRow.team_id == owner.team_id, MetricRow.sandbox_id.in_(sandbox_ids),
                       MetricRow.ts >= since).order_by(MetricRow.sandbox_id, MetricRow.ts))
        found: dict[str, list[tuple[float, float, int, int, int]]] = {}
        for sandbox_id, *sample in await self._db.read(lambda session: session.execute(stmt).all()):
            found.setdefault(sandbox_id, []).append(tuple(sample))
        return found

    async def sample_once(self) -> None:
        rows = await self._db.read(
            lambda session: list(session.scalars(select(SandboxRow).where(SandboxRow.state == "running"))))
        for row in rows:
            try:
                data = await self.orchestrator.metrics(row.id)
            except EnvdUnavailable:
                continue
            if data is not None:
                killed = await self._db.write(functools.partial(self._add_sample, sandbox_id=row.id, data=data))
                if killed:
                    await self.announce(row, events.OUT_OF_MEMORY, killed=killed, last=data.get("oom_last"))

    def _add_sample(self, session: Session, sandbox_id: str, data: dict) -> int:
        """Stores the sample; returns how many processes envd's OOM guard killed since the last sample."""
        stored = session.get(SandboxRow, sandbox_id)
        if stored is None:
            return 0  # killed while we were asking
        kills = int(data.get("oom_kills") or 0)  # since the sandbox's last /init (its start or resume)
        new_kills = max(0, kills - (stored.oom_kills or 0))
        stored.oom_kills = kills
        session.add(MetricRow(sandbox_id=sandbox_id, ts=float(data.get("ts", time.time())),
                              cpu_count=int(data["cpu_count"]), cpu_used_pct=float(data["cpu_used_pct"]),
                              mem_used=int(data["mem_used"]), mem_total=int(data["mem_total"]),
                              mem_cache=int(data["mem_cache"]), disk_used=int(data["disk_used"]),
                              disk_total=int(data["disk_total"])))
        kept = select(MetricRow.id).where(MetricRow.sandbox_id == sandbox_id).order_by(
            MetricRow.ts.desc()).limit(self._settings.metrics_kept)
        session.execute(delete(MetricRow).where(MetricRow.sandbox_id == sandbox_id, MetricRow.id.not_in(kept)))
        return new_kills

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.metrics_interval_s)
            try:
                await self.sample_once()
            except Exception:
                log.exception("metrics sampling failed")
