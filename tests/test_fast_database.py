"""The state database is used off the event loop (control/db.py `Database`): the proxy shares the loop, so a
slow query or a wait for SQLite's write lock must never hold up anything else running on it."""

from __future__ import annotations

import ast
import asyncio
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from corral.control.db import ApiKeyRow, open_database

SRC = Path(__file__).resolve().parent.parent / "src" / "corral"


def test_a_slow_unit_of_work_leaves_the_event_loop_free(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")
    release = threading.Event()

    def slow(session):
        release.wait(10)  # until the loop, still running, lets it go (or 10 s: then the loop was blocked)
        return session.execute(text("select 1")).scalar()

    async def scenario() -> None:
        unit = asyncio.ensure_future(database.read(slow))
        await asyncio.sleep(0)  # the unit is on its way
        assert await asyncio.ensure_future(asyncio.sleep(0, result="ran")) == "ran"
        assert not unit.done(), "the unit of work ran on the event loop"
        release.set()
        assert await unit == 1

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        database.close()


def test_units_of_work_run_in_the_order_they_were_submitted(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")

    def add(n: int):
        def unit(session) -> None:
            session.add(ApiKeyRow(id=f"k{n}", name=str(n), prefix="e2b_", digest=f"{n:064d}", created_at=n))
        return unit

    async def scenario() -> list[str]:
        await asyncio.gather(*(database.write(add(n)) for n in range(20)))
        return await database.read(lambda session: [r.id for r in session.query(ApiKeyRow).order_by(
            ApiKeyRow.created_at)])

    try:
        assert asyncio.run(scenario()) == [f"k{n}" for n in range(20)]
    finally:
        database.close()


def test_a_failed_write_is_rolled_back_and_raises_to_its_caller(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")

    def half_then_fail(session) -> None:
        session.add(ApiKeyRow(id="k1", name="one", prefix="e2b_", digest="1" * 64, created_at=1.0))
        session.flush()
        raise LookupError("no such thing")

    async def scenario() -> int:
        with pytest.raises(LookupError, match="no such thing"):
            await database.write(half_then_fail)
        return await database.read(lambda session: session.query(ApiKeyRow).count())

    try:
        assert asyncio.run(scenario()) == 0
    finally:
        database.close()


def test_only_the_database_module_opens_sessions():
    """Everything else hands `Database` a unit of work; a session opened elsewhere would run on the loop."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path == SRC / "control" / "db.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sqlalchemy"):
                names = {alias.name for alias in node.names}
                if names & {"sessionmaker", "create_engine", "scoped_session"}:
                    offenders.append(f"{path.relative_to(SRC)} imports {sorted(names)}")
    assert offenders == []
