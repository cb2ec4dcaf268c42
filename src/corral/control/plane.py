"""The control plane put together: the one place that knows every control/ module and wires them.

    api.py, api_branching.py ──▶ sandboxes.py, branching.py, tree.py
    branching.py ──▶ sandboxes.py, tree.py          (and hands itself to sandboxes as its CheckpointHooks)
    recovery.py  ──▶ sandboxes.py, tree.py          (at start-up)
    all of them  ──▶ db.py, errors.py, orchestrator/
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from corral.config import PlatformSettings
from corral.control.branching import Branching
from corral.control.db import CheckpointRow, Database, SandboxRow
from corral.control.events import Events
from corral.control.keys import Owner, owner_of
from corral.control.metering import Meter, Prices
from corral.control.recordings import RecordingLimits, Recordings
from corral.control.recovery import recover
from corral.control.sandboxes import Sandboxes
from corral.control.secrets import Secrets
from corral.control.templates import Templates
from corral.control.tree import CheckpointTree
from corral.control.volumes import Volumes
from corral.control.webhooks import Webhooks
from corral.observability.metrics import ServerMetrics
from corral.orchestrator.checkpoints import CheckpointFiles
from corral.orchestrator.sandboxes import Orchestrator

log = logging.getLogger("corral.plane")


class ControlPlane:
    def __init__(self, database: Database, orchestrator: Orchestrator, settings: PlatformSettings, *,
                 checkpoint_dir: Path, recordings_dir: Path | None = None,
                 is_template: Callable[[str], bool], secrets: Secrets | None = None,
                 volumes: Volumes | None = None, metrics: ServerMetrics | None = None,
                 prices: Prices | None = None, webhooks: Webhooks | None = None) -> None:
        self._db = database
        self.settings = settings
        self.orchestrator = orchestrator
        self.sandboxes = Sandboxes(database, orchestrator, settings)
        self.tree = CheckpointTree(database, CheckpointFiles(checkpoint_dir, orchestrator.runtime), orchestrator)
        self.branching = Branching(database, self.sandboxes, self.tree, orchestrator, is_template=is_template)
        self.sandboxes.checkpoints = self.branching
        self.metrics = self.sandboxes.server_metrics = self.branching.metrics = metrics or ServerMetrics()
        # The domain sandboxes are served under over HTTPS (`<port>-<id>.<domain>`), named in answers.
        self.public_domain: str | None = None
        self.secrets = secrets
        self.volumes = self.sandboxes.volumes = volumes
        self.recordings = self.sandboxes.recordings = Recordings(
            database, self.sandboxes, recordings_dir or checkpoint_dir.parent / "recordings",
            RecordingLimits(max_seconds=settings.recording_max_s, max_bytes=settings.recording_max_mb << 20,
                            max_per_owner=settings.recordings_per_key))
        # Templates users build (control/templates.py); None on a server that builds none.
        self.templates: Templates | None = None
        self.branching.template_name = self.template_name
        self.events = self.sandboxes.events = Events(database)
        # Deliveries of the events to the teams' webhooks (control/webhooks.py); None on a server without them.
        self.webhooks = webhooks
        if webhooks is not None:
            self.events.subscribe(webhooks.listener)
        self.meter = Meter(database, prices or Prices(), interval_s=settings.metering_interval_s)
        self.meter.published = self.events.notify
        self._pruner: asyncio.Task | None = None
        self.meter.pause_team = self._pause_team_at_cap
        self.sandboxes.admission.spent = self.meter.spent

    async def _prune_events(self) -> None:
        while True:
            try:
                gone = await self.events.prune(self.settings.events_keep_days)
                if gone:
                    log.info("deleted %d events older than %g days", gone, self.settings.events_keep_days)
            except Exception:
                log.exception("pruning old events failed")
            await asyncio.sleep(3600)

    async def _pause_team_at_cap(self, team_id: str) -> None:
        """The "pause" cap policy: the team's running sandboxes are paused with their memory (resumable once
        the cap is raised or the month turns)."""
        running = await self._db.read(lambda session: list(session.scalars(
            select(SandboxRow).where(SandboxRow.team_id == team_id, SandboxRow.state == "running"))))
        for row in running:
            try:
                await self.branching.pause(owner_of(row), row.id, memory=True, reason="spending cap")
            except Exception as e:  # killed or paused meanwhile, or a pause that failed: the others go on
                log.warning("pausing %s at its team's spending cap failed: %s", row.id, e)

    async def template_name(self, owner: Owner, template: str) -> str | None:
        """The name of the built template `template` names by id, for the key's template allow-list; only
        asked of the database when the key has an allow-list (creates and forks of other keys pay nothing)."""
        if owner.limits.templates is None or self.templates is None:
            return None
        return await self.templates.name_of(owner, template)

    async def template_in_use(self, template_id: str) -> bool:
        """Whether a sandbox (running or paused) or a checkpoint stands on a build of the template."""
        def read(session) -> bool:
            for model in (SandboxRow, CheckpointRow):
                if session.scalar(select(model.id).where(
                        (model.template == template_id) | model.template.startswith(f"{template_id}:"))):
                    return True
            return False
        return await self._db.read(read)

    async def start(self) -> None:
        if self.volumes is not None:  # mounted before the sandboxes that use them are adopted or resumed
            await self.volumes.open()
        await recover(self._db, self.orchestrator, self.sandboxes, self.tree)
        if self.webhooks is not None:
            await self.webhooks.start()
        await self.recordings.open()
        self.sandboxes.start_sampling()
        await self.meter.flush()  # what ran while no server did (adopted sandboxes), and the spending
        self.meter.start()
        if self.settings.events_keep_days > 0:
            self._pruner = asyncio.get_running_loop().create_task(self._prune_events())

    async def close(self) -> None:
        """Stops timers and sampling; live sandboxes keep running so a restarted server finds them again."""
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        await self.events.settled()
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.meter.close()
        await self.sandboxes.close()
        await self.orchestrator.close()
