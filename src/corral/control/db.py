"""Durable state: API keys, sandboxes and their metric samples, through SQLAlchemy (SQLite by default;
nothing here is SQLite-specific, so PostgreSQL is a URL away)."""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


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


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
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


def open_database(url: str) -> sessionmaker:
    engine = create_engine(url, connect_args={"check_same_thread": False} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL with NORMAL sync: a commit costs no fsync on the hot create path, and a crash loses at most
    # the last moments of writes, never the database.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


__all__ = ["ApiKeyRow", "Engine", "MetricRow", "SandboxRow", "open_database"]
