"""Teams, scopes, expiry and limits of API keys, on the fake runtime without root: the route-scope table
against the application's routes, every scoped route refused to a key without its scope, what two keys of a
team and a key of another team see, expired and revoked keys, the envd token only for `execute`, per-key
limits, and the migration of a database from before teams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time

import pytest
from helpers.fast import TEMPLATE, platform
from sqlalchemy import create_engine, text

from corral.config import PlatformSettings
from corral.control import scopes
from corral.control.db import open_database
from corral.control.keys import ApiKeys, KeyLimits
from corral.control.openapi import document
from corral.orchestrator import capacity

pytestmark = pytest.mark.anyio

SETTINGS = PlatformSettings(database_url="", pool_size=0, pool_templates=(), prepared_pool_size=0, resume_warm_s=0,
                            resume_warm_max=4, max_timeout_s=0, metrics_interval_s=3600, metrics_kept=10,
                            idle_freeze_s=0, idle_fresh_s=0, idle_breathe_every_s=10, metrics_token="",
                            metrics_public=False)
NEW_SANDBOX = {"templateID": TEMPLATE, "timeout": 60}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_refills(monkeypatch):
    monkeypatch.setattr(capacity, "REFILL_DELAY_S", 0.01)


@contextlib.asynccontextmanager
async def served(tmp_path):
    """The API over a started control plane on the fake runtime: (HTTP client, the keys service)."""
    async with platform(tmp_path, SETTINGS) as served:
        yield served.http, served.keys


async def new_key(keys: ApiKeys, name: str, **options) -> dict[str, str]:
    _, secret = await keys.create(name, **options)
    return {"X-API-KEY": secret}


def keyed_routes() -> set[tuple[str, str]]:
    """Every operation of the OpenAPI document that takes an API key."""
    routes = set()
    for path, operations in document()["paths"].items():
        for method, operation in operations.items():
            if any(p.get("in") == "header" and p["name"].lower() == "x-api-key"
                   for p in operation.get("parameters", [])):
                routes.add((method.upper(), path))
    return routes


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "nothing", path)


# ------------------------------------------------------------------------------------------ the table


def test_every_route_that_takes_a_key_has_a_scope_and_every_scope_entry_is_a_route():
    routes = keyed_routes()
    assert len(routes) > 40
    assert routes - set(scopes.ROUTE_SCOPES) == set(), "routes without a scope in control/scopes.py ROUTE_SCOPES"
    assert set(scopes.ROUTE_SCOPES) - routes == set(), "ROUTE_SCOPES entries that are no route"
    assert set(scopes.ROUTE_SCOPES.values()) <= set(scopes.ALL)
    # Reading is open to every key; each other scope guards at least one route (admin: webhooks).
    assert {scope for scope in scopes.ROUTE_SCOPES.values()} == set(scopes.ALL)


async def test_each_scoped_route_refuses_a_key_without_its_scope_and_names_it(tmp_path):
    async with served(tmp_path) as (http, keys):
        without = {scope: await new_key(keys, f"no-{scope}", scopes=[s for s in scopes.DEFAULT if s != scope])
                   for scope in set(scopes.DEFAULT) - {scopes.READ}}
        without[scopes.ADMIN] = await new_key(keys, "no-admin")  # the default scopes: all but admin
        for (method, path), needed in sorted(scopes.ROUTE_SCOPES.items()):
            if needed == scopes.READ:
                continue
            answer = await http.request(method, concrete(path), headers=without[needed], json={})
            assert answer.status_code == 403, (method, path, answer.status_code, answer.text)
            assert f"lacks the '{needed}' scope" in answer.json()["message"], (method, path)


async def test_a_read_only_key_reads_but_changes_nothing(tmp_path):
    async with served(tmp_path) as (http, keys):
        reader = await new_key(keys, "reader", scopes=["read"])
        writer = await new_key(keys, "writer", team=(await keys.list())[0].team_id)
        sandbox_id = (await http.post("/sandboxes", headers=writer, json=NEW_SANDBOX)).json()["sandboxID"]
        listed = await http.get("/v2/sandboxes", headers=reader)
        assert [s["sandboxID"] for s in listed.json()] == [sandbox_id]
        for (method, path), needed in sorted(scopes.ROUTE_SCOPES.items()):
            answer = await http.request(method, concrete(path), headers=reader, json={})
            refused = answer.status_code == 403 and "lacks the" in answer.text
            assert refused == (needed != scopes.READ), (method, path, answer.status_code, answer.text)
        assert (await http.delete(f"/sandboxes/{sandbox_id}", headers=reader)).status_code == 403
        assert (await http.get(f"/sandboxes/{sandbox_id}", headers=writer)).status_code == 200


async def test_admin_holds_every_scope(tmp_path):
    async with served(tmp_path) as (http, keys):
        admin = await new_key(keys, "admin", scopes=["admin"])
        created = await http.post("/sandboxes", headers=admin, json=NEW_SANDBOX)
        assert created.status_code == 201
        assert created.json()["envdAccessToken"]
        assert (await http.delete(f"/sandboxes/{created.json()['sandboxID']}", headers=admin)).status_code == 204


# ------------------------------------------------------------------------------------------ teams


async def test_keys_of_a_team_share_its_sandboxes_and_another_team_sees_nothing(tmp_path):
    async with served(tmp_path) as (http, keys):
        team = await keys.create_team("research")
        first, second = await new_key(keys, "a", team=team.name), await new_key(keys, "b", team=team.id)
        stranger = await new_key(keys, "c")  # a team of its own
        sandbox_id = (await http.post("/sandboxes", headers=first, json=NEW_SANDBOX)).json()["sandboxID"]
        assert [s["sandboxID"] for s in (await http.get("/v2/sandboxes", headers=second)).json()] == [sandbox_id]
        assert (await http.get(f"/sandboxes/{sandbox_id}", headers=second)).status_code == 200
        assert (await http.get("/v2/sandboxes", headers=stranger)).json() == []
        for method, path in (("GET", f"/sandboxes/{sandbox_id}"), ("DELETE", f"/sandboxes/{sandbox_id}"),
                             ("POST", f"/sandboxes/{sandbox_id}/timeout"), ("POST", f"/sandboxes/{sandbox_id}/pause"),
                             ("GET", f"/sandboxes/{sandbox_id}/logs"), ("POST", f"/sandboxes/{sandbox_id}/fork")):
            answer = await http.request(method, path, headers=stranger, json={"timeout": 30})
            assert answer.status_code == 404, (method, path, answer.text)
        # The second key of the team may end what the first made.
        assert (await http.delete(f"/sandboxes/{sandbox_id}", headers=second)).status_code == 204
        assert (await http.get("/v2/sandboxes", headers=first)).json() == []


async def test_revoked_and_expired_keys_are_refused_at_once(tmp_path):
    async with served(tmp_path) as (http, keys):
        _, secret = await keys.create("short-lived", expires_at=time.time() + 0.5)
        headers = {"X-API-KEY": secret}
        assert (await http.get("/v2/sandboxes", headers=headers)).status_code == 200
        await asyncio.sleep(0.6)
        expired = await http.get("/v2/sandboxes", headers=headers)
        assert expired.status_code == 401 and expired.json()["message"] == "Invalid API key"
        other, other_secret = await keys.create("revoked")
        assert (await http.get("/v2/sandboxes", headers={"X-API-KEY": other_secret})).status_code == 200
        await keys.revoke(other.id)
        assert (await http.get("/v2/sandboxes", headers={"X-API-KEY": other_secret})).status_code == 401
        with pytest.raises(ValueError, match="past"):
            await keys.create("never", expires_at=time.time() - 1)


async def test_the_envd_token_goes_only_to_keys_that_may_execute(tmp_path):
    async with served(tmp_path) as (http, keys):
        manager = await new_key(keys, "manager", scopes=["sandboxes"])
        created = await http.post("/sandboxes", headers=manager, json=NEW_SANDBOX)
        assert created.status_code == 201 and created.json()["envdAccessToken"] is None
        team = (await keys.list())[0].team_id
        runner = await new_key(keys, "runner", team=team, scopes=["sandboxes", "execute"])
        sandbox_id = created.json()["sandboxID"]
        assert (await http.get(f"/sandboxes/{sandbox_id}", headers=runner)).json()["envdAccessToken"]
        assert (await http.get(f"/sandboxes/{sandbox_id}", headers=manager)).json().get("envdAccessToken") is None
        connected = await http.post(f"/sandboxes/{sandbox_id}/connect", headers=runner, json={"timeout": 60})
        assert connected.json()["envdAccessToken"]
        # The token that opens a private sandbox's ports goes the same way.
        private = {**NEW_SANDBOX, "network": {"allowPublicTraffic": False}}
        made = await http.post("/sandboxes", headers=runner, json=private)
        assert made.status_code == 201 and made.json()["trafficAccessToken"]
        assert (await http.post(f"/sandboxes/{made.json()['sandboxID']}/connect", headers=manager,
                                json={"timeout": 60})).json().get("trafficAccessToken") is None


async def test_unknown_scopes_and_teams_are_refused(tmp_path):
    async with served(tmp_path) as (_, keys):
        with pytest.raises(scopes.UnknownScope, match=r"unknown scope.*root"):
            await keys.create("x", scopes=["root"])
        with pytest.raises(scopes.UnknownScope, match="at least one"):
            await keys.create("x", scopes=[])
        with pytest.raises(LookupError):
            await keys.create("x", team="no-such-team")
        await keys.create_team("dup")
        with pytest.raises(ValueError):
            await keys.create_team("dup")
        with pytest.raises(ValueError):
            await keys.create_team("bad name!")


# ------------------------------------------------------------------------------------------ limits


async def test_key_limits_on_templates_timeouts_resources_and_concurrency(tmp_path):
    async with served(tmp_path) as (http, keys):
        only_other = await new_key(keys, "other", limits=KeyLimits(templates=("desktop",)))
        refused = await http.post("/sandboxes", headers=only_other, json=NEW_SANDBOX)
        assert refused.status_code == 403 and "may not start sandboxes of 'base'" in refused.json()["message"]

        short = await new_key(keys, "short", limits=KeyLimits(max_timeout_s=30))
        too_long = await http.post("/sandboxes", headers=short, json=NEW_SANDBOX)
        assert too_long.status_code == 400 and "maximum of 30s" in too_long.json()["message"]
        ok = await http.post("/sandboxes", headers=short, json={**NEW_SANDBOX, "timeout": 30})
        assert ok.status_code == 201
        longer = await http.post(f"/sandboxes/{ok.json()['sandboxID']}/timeout", headers=short, json={"timeout": 31})
        assert longer.status_code == 400

        small = await new_key(keys, "small", limits=KeyLimits(max_memory_mb=128))
        big = await http.post("/sandboxes", headers=small, json=NEW_SANDBOX)
        assert big.status_code == 403 and "MB of memory" in big.json()["message"]

        two = await new_key(keys, "two", limits=KeyLimits(max_concurrent=2))
        first = await http.post("/sandboxes", headers=two, json=NEW_SANDBOX)
        second = await http.post("/sandboxes", headers=two, json=NEW_SANDBOX)
        third = await http.post("/sandboxes", headers=two, json=NEW_SANDBOX)
        assert (first.status_code, second.status_code, third.status_code) == (201, 201, 429)
        assert "at most 2 sandboxes at once" in third.json()["message"]
        # Another key of no limit is not counted against it, and a kill makes room.
        assert (await http.post("/sandboxes", headers=short, json={**NEW_SANDBOX, "timeout": 30})).status_code == 201
        assert (await http.delete(f"/sandboxes/{first.json()['sandboxID']}", headers=two)).status_code == 204
        assert (await http.post("/sandboxes", headers=two, json=NEW_SANDBOX)).status_code == 201


# ------------------------------------------------------------------------------------------ migration


# Three tables as Corral made them before teams (the others are made fresh either way).
OLD_TABLES = (
    "CREATE TABLE api_keys (id VARCHAR(32) NOT NULL, name VARCHAR(200) NOT NULL, prefix VARCHAR(16) NOT NULL, "
    "digest VARCHAR(64) NOT NULL, created_at FLOAT NOT NULL, revoked_at FLOAT, PRIMARY KEY (id))",
    "CREATE TABLE sandboxes (id VARCHAR(64) NOT NULL, key_id VARCHAR(32) NOT NULL, template VARCHAR(200) NOT NULL, "
    "envd_token VARCHAR(128) NOT NULL, sandbox_metadata JSON NOT NULL, env_vars JSON NOT NULL, "
    "started_at FLOAT NOT NULL, end_at FLOAT NOT NULL, vcpus FLOAT NOT NULL, memory_mb INTEGER NOT NULL, "
    "disk_mb INTEGER NOT NULL, internet BOOLEAN NOT NULL, state VARCHAR(16) NOT NULL, lifecycle JSON NOT NULL, "
    "runtime_id VARCHAR(64), head VARCHAR(64), paused_node VARCHAR(64), pause_mode VARCHAR(16), "
    "timeout_s INTEGER NOT NULL, ingress JSON, egress JSON, volume_mounts JSON, PRIMARY KEY (id), "
    "FOREIGN KEY(key_id) REFERENCES api_keys (id))",
    "CREATE TABLE volumes (id VARCHAR(32) NOT NULL, key_id VARCHAR(32) NOT NULL, name VARCHAR(128) NOT NULL, "
    "size_mb INTEGER NOT NULL, token_digest VARCHAR(64) NOT NULL, token_sealed BLOB NOT NULL, "
    "created_at FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (key_id, name), FOREIGN KEY(key_id) REFERENCES api_keys (id))",
)


def make_old_database(url: str) -> None:
    engine = create_engine(url)
    now = time.time()
    with engine.begin() as connection:
        for statement in OLD_TABLES:
            connection.execute(text(statement))
        for key_id, name in (("aaaa1111", "default"), ("bbbb2222", "default"), ("cccc3333", "ci")):
            connection.execute(text("INSERT INTO api_keys (id, name, prefix, digest, created_at) "
                                    "VALUES (:id, :name, 'e2b_', :digest, :now)"),
                               {"id": key_id, "name": name, "digest": key_id * 8, "now": now})
        connection.execute(text(
            "INSERT INTO sandboxes (id, key_id, template, envd_token, sandbox_metadata, env_vars, started_at, end_at, "
            "vcpus, memory_mb, disk_mb, internet, state, lifecycle, timeout_s) VALUES ('sbx1', 'bbbb2222', 'base', "
            "'t', '{}', '{}', :now, :now, 1, 512, 1024, 1, 'paused', '{}', 300)"), {"now": now})
        connection.execute(text(
            "INSERT INTO volumes (id, key_id, name, size_mb, token_digest, token_sealed, created_at) "
            "VALUES ('vol1', 'cccc3333', 'data', 64, 'd', x'00', :now)"), {"now": now})
    engine.dispose()


async def test_a_database_from_before_teams_gets_a_team_per_key_and_keeps_what_each_owned(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_old_database(url)
    database = open_database(url)
    keys = ApiKeys(database)
    teams = {t.id: t for t in await keys.teams()}
    assert set(teams) == {"aaaa1111", "bbbb2222", "cccc3333"}
    assert sorted(t.name for t in teams.values()) == ["aaaa1111", "ci", "default"] or \
        sorted(t.name for t in teams.values()) == ["bbbb2222", "ci", "default"]
    by_id = {k.id: k for k in await keys.list()}
    assert {k: v.team_id for k, v in by_id.items()} == {"aaaa1111": "aaaa1111", "bbbb2222": "bbbb2222",
                                                         "cccc3333": "cccc3333"}
    assert by_id["aaaa1111"].scopes == frozenset(scopes.DEFAULT)
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT team_id FROM sandboxes WHERE id = 'sbx1'")).scalar() == "bbbb2222"
        assert connection.execute(text("SELECT team_id FROM volumes WHERE id = 'vol1'")).scalar() == "cccc3333"
    engine.dispose()
    database.close()
    # Opening it again changes nothing.
    again = open_database(url)
    assert len(await ApiKeys(again).teams()) == 3
    again.close()


# ------------------------------------------------------------------------------------------ the CLI


def test_the_cli_makes_teams_and_keys_with_scopes_expiry_and_limits(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from corral.cli.main import app

    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CORRAL_DATABASE_URL", raising=False)
    cli = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = cli.invoke(app, list(args))
        assert result.exit_code == code, (args, result.output)
        return result.output

    team_id = run("teams", "create", "research").strip()
    assert team_id.startswith("team_")
    assert "exists already" in run("teams", "create", "research", code=1)
    made = json.loads(run("keys", "create", "--name", "ci", "--team", "research", "--scope", "sandboxes",
                          "--scope", "execute", "--expires-in", "2h", "--templates", "base,desktop",
                          "--max-timeout", "600", "--max-concurrent", "3", "--json"))
    assert made["team"] == team_id and made["scopes"] == ["execute", "read", "sandboxes"]
    assert 7100 < made["expires_at"] - time.time() <= 7200
    [listed] = json.loads(run("keys", "ls", "--team", team_id, "--json"))
    assert listed["id"] == made["id"] and listed["state"] == "active"
    assert listed["limits"] == {"templates": ["base", "desktop"], "max_timeout_s": 600, "max_concurrent": 3}
    assert made["key"] not in run("keys", "ls")
    assert "unknown scope" in run("keys", "create", "--scope", "root", code=1)
    assert "no team" in run("keys", "create", "--team", "nobody", code=1)
    assert "not a duration" in run("keys", "create", "--expires-in", "soon", code=2)
    [team] = [t for t in json.loads(run("teams", "ls", "--json")) if t["id"] == team_id]
    assert team["keys"] == 1
    run("keys", "revoke", made["id"])
    assert json.loads(run("keys", "ls", "--team", "research", "--json"))[0]["state"] == "revoked"


OPEN_AT = """
import sys, time
from corral.control.db import open_database
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
open_database(sys.argv[1]).close()
"""


def test_processes_opening_an_old_database_at_once_migrate_it_once(tmp_path):
    """A server and CLI commands started together each open the database: its migration runs in one of them,
    under the write lock, and the others find it done."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_old_database(url)
    start = time.time() + 2  # all interpreters are up by then: they open the database together
    opening = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(start)], stderr=subprocess.PIPE, text=True)
               for _ in range(6)]
    failed = [p.stderr.read()[-800:] for p in opening if p.wait(timeout=60) != 0]
    assert failed == []
    engine = create_engine(url)
    with engine.connect() as connection:
        assert sorted(connection.execute(text("SELECT id FROM teams")).scalars()) == ["aaaa1111", "bbbb2222",
                                                                                      "cccc3333"]
        assert connection.execute(text("SELECT team_id FROM sandboxes WHERE id = 'sbx1'")).scalar() == "bbbb2222"
    engine.dispose()
