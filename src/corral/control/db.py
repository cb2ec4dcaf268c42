"""Durable state: API keys, sandboxes and their metric samples, through SQLAlchemy (SQLite by default;
nothing here is SQLite-specific, so PostgreSQL is a URL away).

Code on the event loop reaches the database only through `Database`: each unit of work (a function given
a Session) runs in one worker thread and is awaited, so a slow query, a wait for SQLite's write lock or a
disk flush never stalls the proxy, which shares the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class TeamRow(Base):
    """A team owns sandboxes, templates, volumes, secrets, checkpoints and recordings; each of its keys sees
    and acts on all of them (within the key's scopes). A database from before teams gets one team per key,
    with the key's id (`_migrate_to_teams`)."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    # Quotas (control/keys.py `TeamQuota`); None: no limit of that kind.
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_vcpus: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_lifetime_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    creates_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Spending (control/metering.py): a monthly budget in the price table's currency, the percentages of it
    # that raise a warning, what happens to running sandboxes at the cap ("finish" or "pause").
    budget: Mapped[float | None] = mapped_column(Float, nullable=True)
    warn_at: Mapped[list | None] = mapped_column(JSON, nullable=True)
    cap_policy: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # {"month": "2026-12", "sent": [50, 80]}: the warnings already raised this month.
    warned: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # First characters of the key, shown in listings so a user can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the whole key; the key itself is never stored.
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Nullable only for databases from before teams, which the migration fills.
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)
    # What the key may do (control/scopes.py); None: the default scopes (keys made before scopes).
    scopes: Mapped[list | None] = mapped_column(JSON, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Per-key limits on what it creates (control/keys.py `KeyLimits`); None: none.
    limits: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the key that made it
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)  # its owner
    template: Mapped[str] = mapped_column(String(200))
    envd_token: Mapped[str] = mapped_column(String(128))
    sandbox_metadata: Mapped[dict] = mapped_column(JSON, default=dict)
    env_vars: Mapped[dict] = mapped_column(JSON, default=dict)
    started_at: Mapped[float] = mapped_column(Float, index=True)
    end_at: Mapped[float] = mapped_column(Float)
    vcpus: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_mb: Mapped[int] = mapped_column(Integer)
    internet: Mapped[bool] = mapped_column(Boolean, default=True)
    state: Mapped[str] = mapped_column(String(16), default="running")
    lifecycle: Mapped[dict] = mapped_column(JSON, default=dict)
    # The runtime's id for the running sandbox; a resumed sandbox keeps its API id but gets a new one.
    runtime_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The checkpoint this sandbox's state descends from (None: straight from a template).
    head: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # While paused: the pause checkpoint and whether it holds memory ("full") or not ("filesystem").
    paused_node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pause_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The last timeout asked for; an automatic resume grants it again.
    timeout_s: Mapped[int] = mapped_column(Integer, default=300)
    # How the proxy treats requests to its ports (control/network.py `Ingress.to_record`).
    ingress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Its egress rules by address (control/network.py `Egress.to_record`).
    egress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Volumes mounted in it: [{"id", "name", "path"}] (control/volumes.py).
    volume_mounts: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # While running: the time up to which its usage is recorded (control/metering.py); None: its start.
    metered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Processes envd's OOM guard killed since the sandbox's start or resume, as last sampled (its events).
    oom_kills: Mapped[int] = mapped_column(Integer, default=0)


class CheckpointRow(Base):
    """A node of the checkpoint tree: a snapshot, a pause or a fork point of some sandbox."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the key that made it
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)  # its owner
    kind: Mapped[str] = mapped_column(String(16))  # snapshot | pause | fork
    parent_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)  # the sandbox it was taken of
    template: Mapped[str] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    node_metadata: Mapped[dict] = mapped_column(JSON, default=dict)
    env_vars: Mapped[dict] = mapped_column(JSON, default=dict)
    envd_token: Mapped[str] = mapped_column(String(128))
    memory: Mapped[bool] = mapped_column(Boolean, default=True)
    vcpus: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_mb: Mapped[int] = mapped_column(Integer)
    internet: Mapped[bool] = mapped_column(Boolean, default=True)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    # False while its files are being written: not listed, not restorable.
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    # The volumes its sandbox had mounted; sandboxes started from it mount them again.
    volume_mounts: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # The time up to which its storage is metered (control/metering.py); None: since it was made.
    metered_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class SecretRow(Base):
    """A secret (control/secrets.py): its value sealed with the installation's key, never stored plain."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the key that made it
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)  # its owner
    name: Mapped[str] = mapped_column(String(128))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    version: Mapped[int] = mapped_column(Integer, default=1)
    secret_metadata: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class TemplateRow(Base):
    """A template users build (control/templates.py); the built-in ones have no row."""

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the key that made it
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)  # its owner
    name: Mapped[str] = mapped_column(String(200))  # `[namespace/]name`, without a tag
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class TemplateBuildRow(Base):
    __tablename__ = "template_builds"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID: the SDK parses it as one
    template_id: Mapped[str] = mapped_column(ForeignKey("templates.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="waiting")  # waiting building ready error
    reason: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {message, step} when it failed
    # The trigger body without registry credentials (they are never stored).
    spec: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    tags: Mapped[list] = mapped_column(JSON, default=list)  # tags to point at it when it is ready
    cpu_count: Mapped[int] = mapped_column(Integer, default=2)
    memory_mb: Mapped[int] = mapped_column(Integer, default=512)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    metered: Mapped[bool] = mapped_column(Boolean, default=False)  # its minutes are in the usage


class TemplateTagRow(Base):
    __tablename__ = "template_tags"
    __table_args__ = (UniqueConstraint("template_id", "tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    template_id: Mapped[str] = mapped_column(ForeignKey("templates.id"), index=True)
    tag: Mapped[str] = mapped_column(String(128))
    build_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[float] = mapped_column(Float)


class VolumeRow(Base):
    """A volume (control/volumes.py): its token sealed with the installation's key and kept as a digest
    to look it up, never stored plain."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the key that made it
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)  # its owner
    name: Mapped[str] = mapped_column(String(128))
    size_mb: Mapped[int] = mapped_column(Integer)
    token_digest: Mapped[str] = mapped_column(String(64))
    token_sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class RecordingRow(Base):
    """A recording of a desktop sandbox's screen (control/recordings.py); its file is
    `<data>/recordings/<id>.mp4` once it has stopped."""

    __tablename__ = "recordings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the key that made it
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)  # its owner
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)  # no foreign key: kept ones outlive it
    state: Mapped[str] = mapped_column(String(16))  # recording | ready | failed
    keep: Mapped[bool] = mapped_column(Boolean, default=False)  # outlives its sandbox
    fps: Mapped[int] = mapped_column(Integer)
    max_seconds: Mapped[int] = mapped_column(Integer)
    max_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer, default=0)
    height: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(String(1000), nullable=True)


class MetricRow(Base):
    __tablename__ = "sandbox_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    cpu_count: Mapped[int] = mapped_column(Integer)
    cpu_used_pct: Mapped[float] = mapped_column(Float)
    mem_used: Mapped[int] = mapped_column(Integer)
    mem_total: Mapped[int] = mapped_column(Integer)
    mem_cache: Mapped[int] = mapped_column(Integer)
    disk_used: Mapped[int] = mapped_column(Integer)
    disk_total: Mapped[int] = mapped_column(Integer)


class UsageDayRow(Base):
    """What a team's key used of a template on one UTC day (control/metering.py)."""

    __tablename__ = "usage_days"
    __table_args__ = (UniqueConstraint("team_id", "key_id", "template", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(String(32), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    template: Mapped[str] = mapped_column(String(200))
    day: Mapped[str] = mapped_column(String(10), index=True)  # YYYY-MM-DD, UTC
    vcpu_s: Mapped[float] = mapped_column(Float, default=0.0)
    memory_gib_s: Mapped[float] = mapped_column(Float, default=0.0)
    disk_gib_h: Mapped[float] = mapped_column(Float, default=0.0)
    snapshot_gib_h: Mapped[float] = mapped_column(Float, default=0.0)
    build_min: Mapped[float] = mapped_column(Float, default=0.0)


class SandboxUsageRow(Base):
    """One sandbox's usage over its life; kept after it ends (its sandbox row is not)."""

    __tablename__ = "sandbox_usage"

    sandbox_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(32), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    template: Mapped[str] = mapped_column(String(200))
    vcpus: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    first_at: Mapped[float] = mapped_column(Float)
    last_at: Mapped[float] = mapped_column(Float)
    running_s: Mapped[float] = mapped_column(Float, default=0.0)
    vcpu_s: Mapped[float] = mapped_column(Float, default=0.0)
    memory_gib_s: Mapped[float] = mapped_column(Float, default=0.0)
    disk_gib_h: Mapped[float] = mapped_column(Float, default=0.0)
    snapshot_gib_h: Mapped[float] = mapped_column(Float, default=0.0)


class EventRow(Base):
    """A lifecycle or operations event of a team (control/events.py)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)  # a UUID, as clients see it
    team_id: Mapped[str] = mapped_column(String(32), index=True)
    sandbox_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    type: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    data: Mapped[dict] = mapped_column(JSON, default=dict)


class Database:
    """Runs units of work off the event loop, one at a time and in the order they were submitted, in one
    worker thread: SQLite lets one writer in at a time anyway, and a unit that reads then writes needs no
    lock against another. Rows come back detached with their columns loaded (`expire_on_commit=False`),
    so the loop reads them without touching the database. (PostgreSQL could use a few threads.)

    A unit that has begun runs to its end even if the coroutine awaiting it is cancelled; one that has
    not begun is dropped."""

    def __init__(self, sessions: sessionmaker, writing: sessionmaker | None = None) -> None:
        """`writing`: sessions for `write` units, when they must begin differently (SQLite: BEGIN IMMEDIATE)."""
        self._sessions = sessions
        self._writing = writing or sessions
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-db")

    async def read(self, work: Callable[[Session], T]) -> T:
        """`work(session)`'s result; nothing it changes is committed."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._read, work)

    async def write(self, work: Callable[[Session], T]) -> T:
        """`work(session)`'s result, in one transaction: committed when it returns, rolled back when it
        raises (the exception reaches the caller)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._write, work)

    def _read(self, work: Callable[[Session], T]) -> T:
        with self._sessions() as session:
            return work(session)

    def _write(self, work: Callable[[Session], T]) -> T:
        with self._writing.begin() as session:
            return work(session)

    def close(self) -> None:
        """Waits for the units already submitted."""
        self._worker.shutdown(wait=True)


def open_database(url: str) -> Database:
    if not url.startswith("sqlite"):
        engine = create_engine(url)
        _prepare(engine)
        return Database(sessionmaker(engine, expire_on_commit=False))
    # Python's sqlite3 begins a transaction only at the first write, so a unit's reads before it would see
    # the database outside any transaction, and another process (`corral usage`, `corral keys`, a second
    # server) could commit in between: a read-modify-write (metering's `metered_at`) would then count twice.
    # Corral begins transactions itself: reads with BEGIN (a consistent snapshot), write units with BEGIN
    # IMMEDIATE (the write lock from their first read on, so they serialize across processes).
    # The tables are made and migrated in one BEGIN IMMEDIATE transaction (SQLite's DDL is transactional):
    # processes opening the database at once (a server and CLI commands) take turns, and the later ones
    # find the work done instead of racing to create or migrate the same tables.
    setup = create_engine(url, connect_args={"check_same_thread": False, "isolation_level": None, "timeout": 30})
    event.listen(setup, "connect", _sqlite_pragmas)
    event.listen(setup, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    _prepare(setup)
    setup.dispose()
    engines = []
    for begin in ("BEGIN", "BEGIN IMMEDIATE"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "isolation_level": None,
                                                  "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", lambda connection, begin=begin: connection.exec_driver_sql(begin))
        engines.append(engine)
    return Database(sessionmaker(engines[0], expire_on_commit=False), sessionmaker(engines[1], expire_on_commit=False))


def _prepare(engine: Engine) -> None:
    """Tables made, and migrated, in one transaction."""
    with engine.begin() as connection:
        Base.metadata.create_all(connection)
        _add_missing_columns(connection)
        _migrate_to_teams(connection)


def _add_missing_columns(connection: Connection) -> None:
    """Databases made by an older Corral lack columns added since; every added column is nullable or has a
    default, so adding it in place is the whole migration."""
    existing = inspect(connection)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            kind = column.type.compile(connection.dialect)
            default = column.default.arg if column.default is not None and column.default.is_scalar else None
            clause = f" DEFAULT {_sql_literal(default)}" if default is not None else ""
            connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{clause}'))


def _migrate_to_teams(connection: Connection) -> None:
    """Before teams each key owned what it made. Each such key becomes the only key of a team with its own
    id (named after the key; the key's id if that name is taken), so that what it owned stays its team's;
    rows get their maker's team. Idempotent: only rows without a team are touched."""
    owned = [t.name for t in Base.metadata.sorted_tables if "team_id" in t.columns and "key_id" in t.columns]
    orphans = connection.execute(text("SELECT id, name, created_at FROM api_keys WHERE team_id IS NULL")).all()
    taken = {name for (name,) in connection.execute(text("SELECT name FROM teams"))}
    for key_id, name, created_at in orphans:
        team_name = name if name not in taken else key_id
        taken.add(team_name)
        connection.execute(text("INSERT INTO teams (id, name, created_at) VALUES (:id, :name, :at)"),
                           {"id": key_id, "name": team_name, "at": created_at})
        connection.execute(text("UPDATE api_keys SET team_id = :id WHERE id = :id"), {"id": key_id})
    for table in owned:
        connection.execute(text(f"UPDATE {table} SET team_id = (SELECT team_id FROM api_keys "
                                f"WHERE api_keys.id = {table}.key_id) WHERE team_id IS NULL"))


def _sql_literal(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL with NORMAL sync: a commit costs no fsync on the hot create path, and a crash loses at most
    # the last moments of writes, never the database.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


__all__ = [
    "ApiKeyRow",
    "CheckpointRow",
    "Database",
    "Engine",
    "MetricRow",
    "SandboxRow",
    "TeamRow",
    "VolumeRow",
    "open_database",
]
