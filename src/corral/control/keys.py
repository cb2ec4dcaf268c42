"""Teams and their API keys: `e2b_` + 40 hex characters (the shape older E2B SDKs check), stored only as
SHA-256. A key belongs to one team, carries scopes (control/scopes.py), may expire, and may carry limits on
what it creates."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from corral.control import scopes as scope_names
from corral.control.db import ApiKeyRow, Database, TeamRow
from corral.control.errors import ApiError

KEY_SHAPE = re.compile(r"^e2b_[0-9a-f]{40}$")
# At a team's spending cap: running sandboxes run on to their end, or are paused (with their memory).
CAP_POLICIES = ("finish", "pause")
TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class KeyLimits:
    """Limits on what one key creates; None: no limit of that kind."""

    templates: tuple[str, ...] | None = None  # template names (without tag) it may create sandboxes from
    max_timeout_s: int | None = None
    max_vcpus: float | None = None
    max_memory_mb: int | None = None
    max_concurrent: int | None = None  # its running sandboxes

    def to_record(self) -> dict | None:
        record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if v is not None}
        return record or None

    @classmethod
    def from_record(cls, record: dict | None) -> KeyLimits:
        record = dict(record or {})
        if record.get("templates") is not None:
            record["templates"] = tuple(record["templates"])
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TeamQuota:
    """Limits on what one team runs; None: no limit of that kind."""

    max_concurrent: int | None = None  # running sandboxes
    max_vcpus: float | None = None  # of its running sandboxes together
    max_memory_mb: int | None = None  # of its running sandboxes together
    max_lifetime_s: int | None = None  # from a sandbox's start to its end, timeouts and extensions included
    creates_per_s: float | None = None  # sandbox creates (forks count each sandbox), a burst of up to 1 s of it
    budget: float | None = None  # monthly spending cap (control/metering.py): no new sandboxes once reached

    FIELDS = ("max_concurrent", "max_vcpus", "max_memory_mb", "max_lifetime_s", "creates_per_s")

    @classmethod
    def of(cls, row) -> TeamQuota:
        if row is None:
            return cls()
        return cls(**{name: getattr(row, name) for name in cls.FIELDS}, budget=row.budget)


@dataclass(frozen=True)
class Owner:
    """Who a request acts for: the key (recorded as the maker of what it creates) and its team (what it
    can see and act on), with the key's limits and the team's quota (none when the server acts by itself)."""

    key_id: str
    team_id: str
    limits: KeyLimits = field(default_factory=KeyLimits)
    quota: TeamQuota = field(default_factory=TeamQuota)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None
    team_id: str = ""
    scopes: frozenset[str] = field(default_factory=lambda: frozenset(scope_names.DEFAULT))
    expires_at: float | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)
    quota: TeamQuota = field(default_factory=TeamQuota)

    @property
    def owner(self) -> Owner:
        return Owner(self.id, self.team_id, self.limits, self.quota)

    def allows(self, scope: str) -> bool:
        return scope_names.allows(self.scopes, scope)


@dataclass(frozen=True)
class Team:
    id: str
    name: str
    created_at: float
    keys: int = 0  # active keys


class KeyNotFound(LookupError):
    pass


class TeamNotFound(LookupError):
    pass


class TeamExists(ValueError):
    pass


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _public(row: ApiKeyRow, team: TeamRow | None = None) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at, revoked_at=row.revoked_at,
                  team_id=row.team_id or row.id, scopes=scope_names.normalize(row.scopes),
                  expires_at=row.expires_at, limits=KeyLimits.from_record(row.limits), quota=TeamQuota.of(team))


def _team_row(session, ref: str) -> TeamRow:
    row = session.get(TeamRow, ref) or session.scalar(select(TeamRow).where(TeamRow.name == ref))
    if row is None:
        raise TeamNotFound(ref)
    return row


class ApiKeys:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def create(self, name: str, *, team: str | None = None, scopes: list[str] | None = None,
                     expires_at: float | None = None, limits: KeyLimits | None = None) -> tuple[ApiKey, str]:
        """Returns the key record and the key itself, which is shown once and never again. `team`: a team's
        id or name; None makes a new team for the key alone (named after the key when that name is free)."""
        held = scope_names.normalize(scopes)
        if expires_at is not None and expires_at <= time.time():
            raise ValueError("the expiry is in the past")
        secret = "e2b_" + secrets.token_hex(20)
        key_id = secrets.token_hex(8)

        def add(session) -> ApiKeyRow:
            if team is None:
                taken = session.scalar(select(TeamRow).where(TeamRow.name == name)) is not None
                team_row = TeamRow(id=key_id, name=key_id if taken or not TEAM_NAME.match(name) else name,
                                   created_at=time.time())
                session.add(team_row)
                session.flush()
            else:
                team_row = _team_row(session, team)
            row = ApiKeyRow(id=key_id, name=name, prefix=secret[:10], digest=_digest(secret), created_at=time.time(),
                            revoked_at=None, team_id=team_row.id, scopes=sorted(held), expires_at=expires_at,
                            limits=(limits or KeyLimits()).to_record())
            session.add(row)
            return row

        return _public(await self._db.write(add)), secret

    async def verify(self, presented: str | None) -> ApiKey | None:
        """The key's record, if it is one of ours, not revoked and not expired (looked up on every API
        request, so a revocation or an expiry applies to the next request)."""
        if not presented or not KEY_SHAPE.match(presented):
            return None
        digest = _digest(presented)
        return await self._usable(lambda session: session.scalar(select(ApiKeyRow).where(ApiKeyRow.digest == digest)))

    async def active(self, key_id: str) -> ApiKey | None:
        """The key with this id, if it is neither revoked nor expired (a dashboard session holds the key's
        id, not the key, and asks this on every request)."""
        return await self._usable(lambda session: session.get(ApiKeyRow, key_id))

    async def _usable(self, find: Callable) -> ApiKey | None:
        """The key `find(session)` reads, with its team, unless it is missing, revoked or expired."""
        def lookup(session) -> tuple[ApiKeyRow | None, TeamRow | None]:
            row = find(session)
            return row, (session.get(TeamRow, row.team_id) if row is not None and row.team_id else None)

        row, team = await self._db.read(lookup)
        if row is None or row.revoked_at is not None:
            return None
        if row.expires_at is not None and row.expires_at <= time.time():
            return None
        return _public(row, team)

    async def list(self, team: str | None = None) -> list[ApiKey]:
        def rows(session) -> list[ApiKeyRow]:
            stmt = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
            if team is not None:
                stmt = stmt.where(ApiKeyRow.team_id == _team_row(session, team).id)
            return list(session.scalars(stmt))

        return [_public(r) for r in await self._db.read(rows)]

    async def revoke(self, key_id: str) -> ApiKey:
        def revoke(session) -> ApiKeyRow:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if row.revoked_at is None:
                row.revoked_at = time.time()
            return row

        return _public(await self._db.write(revoke))

    # --- teams -------------------------------------------------------------------------------------

    async def create_team(self, name: str) -> Team:
        if not TEAM_NAME.match(name):
            raise ValueError("a team name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")

        def add(session) -> TeamRow:
            if session.scalar(select(TeamRow).where(TeamRow.name == name)) is not None:
                raise TeamExists(name)
            row = TeamRow(id="team_" + secrets.token_hex(6), name=name, created_at=time.time())
            session.add(row)
            return row

        row = await self._db.write(add)
        return Team(row.id, row.name, row.created_at)

    async def teams(self) -> list[Team]:
        def rows(session):
            active = (select(ApiKeyRow.team_id, func.count().label("n")).where(ApiKeyRow.revoked_at.is_(None))
                      .group_by(ApiKeyRow.team_id).subquery())
            return list(session.execute(select(TeamRow, active.c.n).outerjoin(active, active.c.team_id == TeamRow.id)
                                        .order_by(TeamRow.created_at)))

        return [Team(t.id, t.name, t.created_at, n or 0) for t, n in await self._db.read(rows)]

    async def update_team(self, ref: str, **changes) -> TeamRow:
        """Sets a team's quota and spending fields (`TeamQuota.FIELDS`, budget, warn_at, cap_policy); a value of
        None removes that limit. Takes effect on the next request."""
        allowed = {*TeamQuota.FIELDS, "budget", "warn_at", "cap_policy"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown team setting(s): {', '.join(sorted(unknown))}")
        for name, value in changes.items():
            if value is None:
                continue
            if name == "cap_policy":
                if value not in CAP_POLICIES:
                    raise ValueError(f"cap_policy is one of {', '.join(CAP_POLICIES)}, not {value!r}")
            elif name == "warn_at":
                if not value or any(not 0 < p <= 100 for p in value):
                    raise ValueError("warn_at are percentages above 0 and at most 100")
            elif value <= 0:
                raise ValueError(f"{name} must be above 0 (or removed)")

        def update(session) -> TeamRow:
            row = _team_row(session, ref)
            for name, value in changes.items():
                setattr(row, name, sorted(set(value)) if name == "warn_at" and value is not None else value)
            if "budget" in changes or "warn_at" in changes:
                row.warned = None  # a new budget's thresholds are announced anew
            return row

        return await self._db.write(update)

    async def team_row(self, ref: str) -> TeamRow:
        return await self._db.read(lambda session: _team_row(session, ref))

    async def team(self, ref: str) -> Team:
        row = await self._db.read(lambda session: _team_row(session, ref))
        return Team(row.id, row.name, row.created_at)


def owner_of(row) -> Owner:
    """Who a stored row (a sandbox, checkpoint, ...) acts for when the server acts on it by itself (a
    timeout's pause, an automatic resume): its maker and its team."""
    return Owner(row.key_id, row.team_id or row.key_id)


def check_timeout(limits: KeyLimits, seconds: int) -> None:
    """Refuses (400, as for the server's own maximum) a timeout above the key's maximum."""
    if limits.max_timeout_s is not None and seconds > limits.max_timeout_s:
        raise ApiError(400, f"timeout {seconds}s is above this API key's maximum of {limits.max_timeout_s}s")


def check_template(limits: KeyLimits, ref: str, name_of_id: str | None = None) -> None:
    """Refuses (403) a template outside the key's allowed ones; `ref` as the request or a sandbox's record
    names it (its tag aside), `name_of_id` the name of the user-built template when `ref` is its id (the
    allow-list names templates; sandboxes record a built template by id)."""
    name = ref.partition(":")[0]
    if limits.templates is not None and name not in limits.templates and name_of_id not in limits.templates:
        allowed = ", ".join(limits.templates) or "none"
        raise ApiError(403, f"this API key may not start sandboxes of {name!r} (allowed: {allowed})")


def check_resources(limits: KeyLimits, template: str, resources) -> None:
    """Refuses (403) a template whose sandboxes are bigger than the key may start."""
    name = template.partition(":")[0]
    if limits.max_vcpus is not None and resources.vcpus > limits.max_vcpus:
        raise ApiError(403, f"{name!r} sandboxes have {resources.vcpus:g} vCPUs, above this API key's "
                            f"maximum of {limits.max_vcpus:g}")
    if limits.max_memory_mb is not None and resources.memory_mb > limits.max_memory_mb:
        raise ApiError(403, f"{name!r} sandboxes have {resources.memory_mb} MB of memory, above this API "
                            f"key's maximum of {limits.max_memory_mb} MB")


def check_key_limits(limits: KeyLimits, template: str, resources, seconds: int,
                     name_of_id: str | None = None) -> None:
    """All of a key's limits on a new running sandbox (a create, fork, start from a checkpoint, resume)."""
    check_template(limits, template, name_of_id)
    check_resources(limits, template, resources)
    check_timeout(limits, seconds)
