"""Team quotas on the fake runtime without root: concurrent sandboxes (creates, forks and resumes
counted), vCPUs and memory together, the longest lifetime, and creates per second (429 with Retry-After)."""

from __future__ import annotations

import asyncio

import pytest
from test_fast_scopes import NEW_SANDBOX, new_key, served

from corral.control.keys import ApiKeys

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
