"""Teams, scoped keys, quotas and metering through a real `corral serve` with the unmodified e2b SDK: two
keys of one team share sandboxes and another team's key finds none; a read-only key cannot create; the
team's concurrency quota raises the SDK's rate-limit error at once; the create rate answers 429 with
Retry-After and the SDK's own retry gets through; a sandbox's usage survives a `kill -9` of the server,
neither lost nor counted twice."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import NotFoundException, RateLimitException, Sandbox, SandboxException, SandboxNotFoundException
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t22", "10.247.0.0/22"


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_METERING_INTERVAL_S": "1"})
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


def team(server, name: str, *settings: str) -> str:
    team_id = server.cli("teams", "create", name).strip()
    if settings:
        server.cli("teams", "set", name, *settings)
    return team_id


def key(server, team_name: str | None, *options: str) -> str:
    return json.loads(server.cli("keys", "create", "--json", *(["--team", team_name] if team_name else []),
                                 *options))["key"]


def opts(server, api_key: str) -> dict:
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": api_key}


def test_two_keys_of_a_team_share_its_sandboxes_and_another_team_finds_none(server):
    team(server, "shared")
    first, second, stranger = key(server, "shared"), key(server, "shared"), key(server, None)
    sbx = Sandbox.create(timeout=120, **opts(server, first))
    try:
        assert [s.sandbox_id for s in Sandbox.list(**opts(server, second)).next_items()] == [sbx.sandbox_id]
        again = Sandbox.connect(sbx.sandbox_id, **opts(server, second))
        assert again.commands.run("echo shared").stdout == "shared\n"
        assert Sandbox.list(**opts(server, stranger)).next_items() == []
        with pytest.raises((SandboxNotFoundException, NotFoundException)):
            Sandbox.connect(sbx.sandbox_id, **opts(server, stranger))
        assert Sandbox.kill(sbx.sandbox_id, **opts(server, stranger)) is False  # the SDK's answer to a 404
        assert again.is_running()
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts(server, second))


def test_the_first_start_prints_an_sdk_key_and_an_admin_key_of_one_team(server):
    """The server's first start made two keys and printed each once: `default` for the SDKs, `admin` for the
    dashboard's sign-in (it may manage webhooks and keys, the other may not)."""
    import re

    printed = server.log.read_text()
    default = re.search(r"export E2B_API_KEY=(e2b_[0-9a-f]{40})   # created now as 'default'", printed).group(1)
    admin = re.search(r"/dashboard sign in with the admin key (e2b_[0-9a-f]{40}) ", printed).group(1)
    hook = {"name": "h", "url": "https://hooks.example.test/corral", "events": ["sandbox.lifecycle.created"]}
    refused = httpx.post(f"{server.url}/events/webhooks", json=hook, headers={"X-API-KEY": default})
    assert refused.status_code == 403 and "'admin' scope" in refused.json()["message"]
    sbx = Sandbox.create(timeout=60, **opts(server, default))
    try:  # one team: the admin key sees the SDK key's sandbox
        assert [s.sandbox_id for s in Sandbox.list(**opts(server, admin)).next_items()] == [sbx.sandbox_id]
    finally:
        sbx.kill()


def test_a_read_only_key_cannot_create_and_is_told_which_scope_it_lacks(server):
    reader = key(server, None, "--scope", "read")
    with pytest.raises(SandboxException, match="lacks the 'sandboxes' scope"):
        Sandbox.create(timeout=60, **opts(server, reader))
    assert Sandbox.list(**opts(server, reader)).next_items() == []


def test_a_key_allowed_a_built_template_by_name_forks_pauses_and_resumes_its_sandboxes(server):
    """Sandboxes record a built template by its id; a key's allow-list names it: both must match."""
    from e2b import Template

    team(server, "builders")
    builder = key(server, "builders")
    built = Template.build(Template().from_template("base").run_cmd("echo allowed > /tmp/built"), "allowed-tpl",
                           **opts(server, builder))
    limited = key(server, "builders", "--templates", "allowed-tpl")
    sbx = Sandbox.create("allowed-tpl", timeout=120, **opts(server, limited))
    try:
        by_id = Sandbox.create(built.template_id, timeout=60, **opts(server, limited))
        by_id.kill()
        forked = httpx.post(f"{server.url}/sandboxes/{sbx.sandbox_id}/fork", json={"count": 1},
                            headers={"X-API-KEY": limited})
        assert forked.status_code == 201, forked.text
        Sandbox.kill(forked.json()[0]["sandbox"]["sandboxID"], **opts(server, limited))
        sbx.beta_pause()
        resumed = Sandbox.connect(sbx.sandbox_id, **opts(server, limited))
        assert resumed.commands.run("cat /tmp/built").stdout == "allowed\n"
        other = key(server, "builders", "--templates", "base")
        with pytest.raises(SandboxException, match="may not start sandboxes of"):
            Sandbox.create("allowed-tpl", timeout=60, **opts(server, other))
        refused = httpx.post(f"{server.url}/sandboxes/{sbx.sandbox_id}/fork", json={"count": 1},
                             headers={"X-API-KEY": other})
        assert refused.status_code == 403 and "may not start sandboxes of" in refused.json()["message"]
    finally:
        sbx.kill()


def test_the_team_concurrency_quota_raises_the_sdks_rate_limit_error(server):
    team(server, "two-at-once", "--max-concurrent", "2")
    member = key(server, "two-at-once")
    running = [Sandbox.create(timeout=120, **opts(server, member)) for _ in range(2)]
    try:
        with pytest.raises(RateLimitException, match="at most 2 sandboxes at once"):
            Sandbox.create(timeout=120, **opts(server, member))
        running.pop().kill()
        running.append(Sandbox.create(timeout=120, **opts(server, member)))
    finally:
        for sbx in running:
            sbx.kill()


def creates(server, key_id: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    return {s.labels["outcome"]: s.value for f in families for s in f.samples
            if s.name == "corral_sandbox_creates_total" and s.labels.get("key_id") == key_id}


def test_the_create_rate_answers_429_with_retry_after_and_the_sdks_retry_gets_through(server):
    team(server, "slow-creator", "--creates-per-second", "0.5")
    made = json.loads(server.cli("keys", "create", "--json", "--team", "slow-creator"))
    first = Sandbox.create(timeout=120, **opts(server, made["key"]))
    raw = httpx.post(f"{server.url}/sandboxes", headers={"X-API-KEY": made["key"]},
                     json={"templateID": "base", "timeout": 60})
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "2"
    # The SDK waits for Retry-After by itself and tries again: the create succeeds.
    second = Sandbox.create(timeout=120, **opts(server, made["key"]))
    try:
        assert second.commands.run("true").exit_code == 0
        assert creates(server, made["id"]) == {"ok": 2, "error": 2}  # the raw 429 and the SDK's first try
    finally:
        first.kill()
        second.kill()


def usage(server, api_key: str) -> dict:
    answer = httpx.get(f"{server.url}/usage", params={"groupBy": ""}, headers={"X-API-KEY": api_key})
    assert answer.status_code == 200, answer.text
    return answer.json()["total"]


def test_usage_survives_a_kill_9_of_the_server_neither_lost_nor_doubled(server):
    metered = key(server, None)
    sbx = Sandbox.create(timeout=300, **opts(server, metered))
    created = time.time()
    vcpus = httpx.get(f"{server.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": metered}).json()["cpuCount"]
    time.sleep(3)
    server.stop(signal.SIGKILL)  # mid-run, between flushes or not
    time.sleep(2)  # the sandbox runs on meanwhile, and is adopted: that time is its usage too
    server.start(wait_pool=1)
    time.sleep(2)
    killing = time.time()
    sbx.kill()  # its usage is recorded as the kill begins; the runtime's teardown follows (~0.4 s)
    ended = time.time()
    ran = usage(server, metered)["vcpuSeconds"] / vcpus
    assert killing - created <= ran <= ended - created + 1, (ran, killing - created, ended - created)
    assert abs(ran - (killing - created)) / (killing - created) < 0.02, (ran, killing - created)
