"""Admission of new sandboxes: a key's limits and its team's quota (concurrent sandboxes, their vCPUs and
memory together, the longest lifetime, creates per second), checked before anything is started.

Creates under way are counted as running from their admission until they are recorded (or fail), so that
concurrent creates cannot together pass a limit each of them would have met alone. The rate limit is a
token bucket per team, held in memory (one server process): a refused create gets 429 with `Retry-After`,
which the SDKs wait for and retry by themselves. A limit that waiting does not lift (concurrency, memory)
gets 429 with `Should-Retry: false`, so the SDKs raise at once instead of retrying."""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy import case, func, select

from corral.control.db import Database, SandboxRow
from corral.control.errors import ApiError
from corral.control.keys import Owner
from corral.runtime.base import Resources

_NO_RETRY = {"Should-Retry": "false"}


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass(frozen=True)
class _Usage:
    sandboxes: int = 0
    vcpus: float = 0.0
    memory_mb: int = 0


class Admission:
    def __init__(self, database: Database, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = database
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        # Creates under way: by key (sandboxes) and by team (sandboxes, vCPUs, memory).
        self._key_starting: Counter[str] = Counter()
        self._team_starting: dict[str, _Usage] = {}
        # This month's spending of a team (control/metering.py `Meter.spent`), for its cap.
        self.spent: Callable[[str], float] = lambda team_id: 0.0

    @contextlib.asynccontextmanager
    async def starting(self, owner: Owner, resources: Resources, count: int = 1,
                       timeout_s: int | None = None) -> AsyncIterator[None]:
        """Around starting `count` sandboxes of `resources` each for `owner`: refuses (ApiError) what its
        key's limits or its team's quota do not allow; counts them as running until the block ends."""
        self.check_lifetime(owner, timeout_s or 0)
        budget = owner.quota.budget
        if budget is not None and (spent := self.spent(owner.team_id)) >= budget:
            raise ApiError(403, f"this team has reached its monthly spending cap ({spent:.2f} of {budget:g}); no new "
                                "sandboxes until the cap is raised or the month ends", _NO_RETRY)
        if owner.limits.max_concurrent is not None or _bounds_running(owner):
            await self._check_running(owner, resources, count)
        self._take_tokens(owner, count)
        team = self._team_starting.get(owner.team_id, _Usage())
        self._key_starting[owner.key_id] += count
        self._team_starting[owner.team_id] = _Usage(team.sandboxes + count, team.vcpus + resources.vcpus * count,
                                                    team.memory_mb + resources.memory_mb * count)
        try:
            yield
        finally:
            self._key_starting[owner.key_id] -= count
            if not self._key_starting[owner.key_id]:
                del self._key_starting[owner.key_id]
            team = self._team_starting[owner.team_id]
            left = _Usage(team.sandboxes - count, team.vcpus - resources.vcpus * count,
                          team.memory_mb - resources.memory_mb * count)
            if left.sandboxes:
                self._team_starting[owner.team_id] = left
            else:
                del self._team_starting[owner.team_id]

    def check_extension(self, owner: Owner, end_at: float, new_end_at: float) -> None:
        """At the team's spending cap a running sandbox may end sooner, not later (the "finish" policy lets
        it run to the end it had)."""
        if new_end_at > end_at and self.capped(owner):
            raise ApiError(403, "this team has reached its monthly spending cap: sandboxes run to their current "
                                "end and cannot be extended until the cap is raised or the month ends", _NO_RETRY)

    def capped(self, owner: Owner) -> bool:
        """Whether the owner's team has reached its monthly spending cap (as of the last metering flush)."""
        budget = owner.quota.budget
        return budget is not None and self.spent(owner.team_id) >= budget

    def check_lifetime(self, owner: Owner, seconds_from_start: float) -> None:
        """400 when a sandbox would live longer than the team's maximum lifetime from its start."""
        longest = owner.quota.max_lifetime_s
        if longest is not None and seconds_from_start > longest:
            raise ApiError(400, f"a sandbox of this team may live at most {longest}s from its start; this would "
                                f"make it {math.ceil(seconds_from_start)}s")

    async def _check_running(self, owner: Owner, resources: Resources, count: int) -> None:
        quota, limits = owner.quota, owner.limits

        # One statement: the key's sandboxes are among its team's.
        stmt = (select(func.coalesce(func.sum(case((SandboxRow.key_id == owner.key_id, 1), else_=0)), 0),
                       func.count(), func.coalesce(func.sum(SandboxRow.vcpus), 0.0),
                       func.coalesce(func.sum(SandboxRow.memory_mb), 0))
                .where(SandboxRow.team_id == owner.team_id, SandboxRow.state == "running"))
        key_running, team_running, team_vcpus, team_memory = await self._db.read(
            lambda session: session.execute(stmt).one())
        team_vcpus, team_memory = float(team_vcpus), int(team_memory)
        starting = self._team_starting.get(owner.team_id, _Usage())
        key_total = key_running + self._key_starting[owner.key_id] + count
        if limits.max_concurrent is not None and key_total > limits.max_concurrent:
            raise ApiError(429, f"this API key may run at most {limits.max_concurrent} sandboxes at once "
                                f"({key_running} running); kill or pause one first", _NO_RETRY)
        if quota.max_concurrent is not None and team_running + starting.sandboxes + count > quota.max_concurrent:
            raise ApiError(429, f"this team may run at most {quota.max_concurrent} sandboxes at once "
                                f"({team_running} running); kill or pause one first", _NO_RETRY)
        vcpus = team_vcpus + starting.vcpus + resources.vcpus * count
        if quota.max_vcpus is not None and vcpus > quota.max_vcpus + 1e-9:
            raise ApiError(429, f"this team may run at most {quota.max_vcpus:g} vCPUs at once; {count} more "
                                f"sandbox(es) of {resources.vcpus:g} would make {vcpus:g}", _NO_RETRY)
        memory = team_memory + starting.memory_mb + resources.memory_mb * count
        if quota.max_memory_mb is not None and memory > quota.max_memory_mb:
            raise ApiError(429, f"this team may run at most {quota.max_memory_mb} MB of sandbox memory at once; "
                                f"{count} more sandbox(es) of {resources.memory_mb} MB would make {memory} MB",
                           _NO_RETRY)

    def _take_tokens(self, owner: Owner, count: int) -> None:
        rate = owner.quota.creates_per_s
        if rate is None:
            return
        now = self._clock()
        capacity = max(1.0, rate)  # a burst of one second's worth
        bucket = self._buckets.setdefault(owner.team_id, _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        # A request for more than a full bucket (a fork of many) waits for a full one and leaves the bucket
        # in debt: the team's next creates wait until the rate has paid for all of it.
        needed = min(float(count), capacity)
        if bucket.tokens < needed:
            wait = (needed - bucket.tokens) / rate
            raise ApiError(429, f"this team may create {rate:g} sandboxes per second; retry in {wait:.2f}s",
                           {"Retry-After": str(max(1, math.ceil(wait)))})
        bucket.tokens -= count


def _bounds_running(owner: Owner) -> bool:
    quota = owner.quota
    return quota.max_concurrent is not None or quota.max_vcpus is not None or quota.max_memory_mb is not None
