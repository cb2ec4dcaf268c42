"""Team quotas on the fake runtime without root: concurrent sandboxes (creates, forks and resumes
counted), vCPUs and memory together, the longest lifetime, and creates per second (429 with Retry-After)."""

from __future__ import annotations

import asyncio

import pytest
from test_fast_scopes import NEW_SANDBOX, new_key, served

from corral.control.keys import ApiKeys, KeyLimits

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def team_key(keys: ApiKeys, **quota) -> tuple[dict[str, str], str]:
    team = await keys.create_team("quota-team")
    await keys.update_team(team.id, **quota)
    return await new_key(keys, "member", team=team.id), team.id


async def test_the_team_concurrency_quota_counts_every_key_and_refuses_without_a_retry(tmp_path):
    async with served(tmp_path) as (http, keys):
        first, team_id = await team_key(keys, max_concurrent=2)
        second = await new_key(keys, "second", team=team_id)
        a = await http.post("/sandboxes", headers=first, json=NEW_SANDBOX)
        b = await http.post("/sandboxes", headers=second, json=NEW_SANDBOX)
        refused = await http.post("/sandboxes", headers=first, json=NEW_SANDBOX)
        assert (a.status_code, b.status_code, refused.status_code) == (201, 201, 429)
        assert "this team may run at most 2 sandboxes at once (2 running)" in refused.json()["message"]
        assert refused.headers["Should-Retry"] == "false"  # waiting does not help: the SDK raises at once
        # Another team is not affected, a paused sandbox does not count, and neither does a killed one.
        assert (await http.post("/sandboxes", headers=await new_key(keys, "other"), json=NEW_SANDBOX)).status_code \
            == 201
        assert (await http.post(f"/sandboxes/{a.json()['sandboxID']}/pause", headers=first)).status_code == 204
        c = await http.post("/sandboxes", headers=first, json=NEW_SANDBOX)
        assert c.status_code == 201
        # Resuming the paused one would make three.
        resumed = await http.post(f"/sandboxes/{a.json()['sandboxID']}/connect", headers=first, json={"timeout": 60})
        assert resumed.status_code == 429
        assert (await http.delete(f"/sandboxes/{c.json()['sandboxID']}", headers=first)).status_code == 204
        assert (await http.post(f"/sandboxes/{a.json()['sandboxID']}/connect", headers=first,
                                json={"timeout": 60})).status_code in (200, 201)


async def test_forks_count_each_sandbox_against_the_quota(tmp_path):
    async with served(tmp_path) as (http, keys):
        member, _ = await team_key(keys, max_concurrent=3)
        parent = (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).json()["sandboxID"]
        too_many = await http.post(f"/sandboxes/{parent}/fork", headers=member, json={"count": 3})
        assert too_many.status_code == 429 and "at most 3 sandboxes" in too_many.json()["message"]
        forked = await http.post(f"/sandboxes/{parent}/fork", headers=member, json={"count": 2})
        assert forked.status_code == 201 and len(forked.json()) == 2
        assert (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).status_code == 429


async def test_vcpu_and_memory_quotas_add_up_the_running_sandboxes(tmp_path):
    async with served(tmp_path) as (http, keys):
        # Sandboxes of `base` have the default resources: 2 vCPUs, 512 MB.
        member, team_id = await team_key(keys, max_vcpus=4)
        assert (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).status_code == 201
        assert (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).status_code == 201
        refused = await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)
        assert refused.status_code == 429 and "at most 4 vCPUs" in refused.json()["message"]
        await keys.update_team(team_id, max_vcpus=None, max_memory_mb=1200)  # at once, on the next request
        refused = await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)
        assert refused.status_code == 429 and "1536 MB" in refused.json()["message"]
        await keys.update_team(team_id, max_memory_mb=None)
        assert (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).status_code == 201


async def test_the_lifetime_quota_bounds_timeouts_and_extensions(tmp_path):
    async with served(tmp_path) as (http, keys):
        member, _ = await team_key(keys, max_lifetime_s=100)
        too_long = await http.post("/sandboxes", headers=member, json={**NEW_SANDBOX, "timeout": 101})
        assert too_long.status_code == 400 and "at most 100s from its start" in too_long.json()["message"]
        sandbox_id = (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).json()["sandboxID"]
        assert (await http.post(f"/sandboxes/{sandbox_id}/timeout", headers=member,
                                json={"timeout": 90})).status_code == 204
        assert (await http.post(f"/sandboxes/{sandbox_id}/timeout", headers=member,
                                json={"timeout": 150})).status_code == 400


async def test_the_create_rate_answers_429_with_retry_after_and_lets_the_next_through_after_it(tmp_path):
    async with served(tmp_path) as (http, keys):
        member, _ = await team_key(keys, creates_per_s=1)
        assert (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).status_code == 201
        limited = await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)
        assert limited.status_code == 429 and "1 sandboxes per second" in limited.json()["message"]
        assert limited.headers["Retry-After"] == "1" and "Should-Retry" not in limited.headers
        await asyncio.sleep(float(limited.headers["Retry-After"]))
        assert (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).status_code == 201
        # Another team has its own bucket.
        assert (await http.post("/sandboxes", headers=await new_key(keys, "other"), json=NEW_SANDBOX)).status_code \
            == 201


async def test_team_settings_are_checked(tmp_path):
    async with served(tmp_path) as (_, keys):
        team = await keys.create_team("checked")
        for bad in ({"max_concurrent": 0}, {"creates_per_s": -1}, {"cap_policy": "explode"}, {"warn_at": [0]},
                    {"warn_at": [120]}, {"colour": "red"}):
            with pytest.raises(ValueError):
                await keys.update_team(team.id, **bad)
        row = await keys.update_team(team.name, budget=10.0, warn_at=[80, 50, 80], cap_policy="pause")
        assert (row.budget, row.warn_at, row.cap_policy) == (10.0, [50, 80], "pause")


async def test_forks_and_starts_from_checkpoints_are_the_forking_keys_and_within_its_limits(tmp_path):
    async with served(tmp_path) as (http, keys):
        team = await keys.create_team("forkers")
        maker = await new_key(keys, "maker", team=team.id)
        parent = (await http.post("/sandboxes", headers=maker, json=NEW_SANDBOX)).json()["sandboxID"]
        elsewhere = await new_key(keys, "elsewhere", team=team.id, limits=KeyLimits(templates=("desktop",)))
        refused = await http.post(f"/sandboxes/{parent}/fork", headers=elsewhere, json={"count": 1})
        assert refused.status_code == 403 and "may not start sandboxes of 'base'" in refused.json()["message"]
        one = await new_key(keys, "one", team=team.id, limits=KeyLimits(max_concurrent=1))
        assert (await http.post(f"/sandboxes/{parent}/fork", headers=one, json={"count": 2})).status_code == 429
        forked = await http.post(f"/sandboxes/{parent}/fork", headers=one, json={"count": 1})
        assert forked.status_code == 201
        child = forked.json()[0]["sandbox"]["sandboxID"]
        # The child is the forking key's: it counts against that key, and the next fork is refused.
        assert (await http.post(f"/sandboxes/{parent}/fork", headers=one, json={"count": 1})).status_code == 429
        snapshot = await http.post(f"/sandboxes/{parent}/snapshots", headers=maker, json={"name": "base-state"})
        started = await http.post("/checkpoints/base-state/sandboxes", headers=one, json={"count": 1})
        assert snapshot.status_code == 201 and started.status_code == 429
        assert (await http.delete(f"/sandboxes/{child}", headers=one)).status_code == 204
        assert (await http.post("/checkpoints/base-state/sandboxes", headers=one, json={"count": 1})).status_code \
            == 201


async def test_a_fork_of_many_waits_for_a_full_bucket_and_leaves_the_team_in_debt(tmp_path):
    async with served(tmp_path) as (http, keys):
        member, _ = await team_key(keys, creates_per_s=1)
        parent = (await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)).json()["sandboxID"]
        await asyncio.sleep(1.0)  # the bucket is full again: one second's worth
        assert (await http.post(f"/sandboxes/{parent}/fork", headers=member, json={"count": 5})).status_code == 201
        after = await http.post("/sandboxes", headers=member, json=NEW_SANDBOX)
        assert after.status_code == 429 and int(after.headers["Retry-After"]) >= 4  # five paid for at one a second


async def test_secrets_in_header_rules_and_volume_mounts_need_their_scopes(tmp_path):
    async with served(tmp_path) as (http, keys):
        runner = await new_key(keys, "runner", scopes=["sandboxes", "execute"])
        rules = {"network": {"rules": {"api.example.com": [
            {"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.prod}"}}}]}}}
        leaking = await http.post("/sandboxes", headers=runner, json={**NEW_SANDBOX, **rules})
        assert leaking.status_code == 403 and "'secrets' scope" in leaking.json()["message"]
        mounting = await http.post("/sandboxes", headers=runner,
                                   json={**NEW_SANDBOX, "volumeMounts": [{"name": "data", "path": "/data"}]})
        assert mounting.status_code == 403 and "'volumes' scope" in mounting.json()["message"]


async def test_a_resume_starts_the_lifetime_anew_and_is_within_it(tmp_path):
    async with served(tmp_path) as (http, keys):
        member, _ = await team_key(keys, max_lifetime_s=100)
        sandbox_id = (await http.post("/sandboxes", headers=member, json={**NEW_SANDBOX, "timeout": 90})).json()[
            "sandboxID"]
        assert (await http.post(f"/sandboxes/{sandbox_id}/pause", headers=member)).status_code == 204
        assert (await http.post(f"/sandboxes/{sandbox_id}/connect", headers=member,
                                json={"timeout": 101})).status_code == 400
        assert (await http.post(f"/sandboxes/{sandbox_id}/connect", headers=member,
                                json={"timeout": 90})).status_code in (200, 201)
        assert (await http.post(f"/sandboxes/{sandbox_id}/timeout", headers=member,
                                json={"timeout": 95})).status_code == 204


async def test_a_create_from_a_snapshot_is_admitted_with_the_snapshots_size(tmp_path):
    from corral.control.db import CheckpointRow

    async with served(tmp_path) as (http, keys):
        team = await keys.create_team("snapshotters")
        maker = await new_key(keys, "maker", team=team.id)
        parent = (await http.post("/sandboxes", headers=maker, json=NEW_SANDBOX)).json()["sandboxID"]
        made = await http.post(f"/sandboxes/{parent}/snapshots", headers=maker, json={"name": "big-state"})
        snapshot_id = made.json()["snapshotID"]

        def grow(session):  # as a snapshot of a 4 GB sandbox would be
            session.get(CheckpointRow, snapshot_id).memory_mb = 4096

        await keys._db.write(grow)
        small = await new_key(keys, "small", team=team.id, limits=KeyLimits(max_memory_mb=1024))
        refused = await http.post("/sandboxes", headers=small, json={"templateID": "big-state", "timeout": 60})
        assert refused.status_code == 403 and "4096 MB of memory" in refused.json()["message"]
        assert (await http.post("/sandboxes", headers=small, json=NEW_SANDBOX)).status_code == 201
