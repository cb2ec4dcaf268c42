"""What an operator of a real `corral serve --log-format json` sees: /metrics parsed with Prometheus's text
parser moving as the unmodified SDK creates, uses and kills sandboxes; request ids in headers, error bodies
and JSON log lines; a sandbox's logs through the API and `corral sandbox logs [--follow]`."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server import CLI, ServerProcess

INSTANCE, NETWORK = "t18", "10.241.0.0/22"
TEMPLATE = "base"


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         log_level="info", extra_env={"CORRAL_LOG_FORMAT": "json"})
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def key(server) -> dict:
    """The API key's secret and id."""
    return json.loads(server.cli("keys", "create", "--name", "observability", "--json"))


@pytest.fixture(scope="module")
def opts(server, key) -> dict:
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key["key"]}


@pytest.fixture()
def sandbox(opts):
    sbx = Sandbox.create(TEMPLATE, **opts)
    yield sbx
    sbx.kill()


def scrape(server) -> dict[str, list]:
    answer = httpx.get(f"{server.url}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    return {family.name: family.samples for family in text_string_to_metric_families(answer.text)}


def value(families: dict, sample: str, **labels) -> float:
    family = sample.removesuffix("_total").removesuffix("_count")
    return sum(s.value for s in families.get(family, ()) if s.name == sample and s.labels == labels)


def test_metrics_move_as_the_sdk_creates_and_kills_a_sandbox(server, key, opts):
    before = scrape(server)
    sbx = Sandbox.create(TEMPLATE, **opts)
    created = scrape(server)
    assert value(created, "corral_sandboxes", state="running", template=TEMPLATE) == \
        value(before, "corral_sandboxes", state="running", template=TEMPLATE) + 1
    assert value(created, "corral_sandbox_creates_total", key_id=key["id"], outcome="ok") == \
        value(before, "corral_sandbox_creates_total", key_id=key["id"], outcome="ok") + 1
    assert value(created, "corral_sandbox_create_seconds_count") == \
        value(before, "corral_sandbox_create_seconds_count") + 1
    assert "corral_pool_ready_sandboxes" in created and "corral_pool_prepared_containers" in created
    sbx.kill()
    killed = scrape(server)
    assert value(killed, "corral_sandboxes", state="running", template=TEMPLATE) == \
        value(before, "corral_sandboxes", state="running", template=TEMPLATE)


def test_proxied_sdk_traffic_is_counted(server, sandbox):
    before = scrape(server)
    assert sandbox.commands.run("echo through-the-proxy").stdout == "through-the-proxy\n"
    after = scrape(server)
    assert value(after, "corral_proxy_requests_total", status_class="2xx") > \
        value(before, "corral_proxy_requests_total", status_class="2xx")
    assert value(after, "corral_proxy_received_bytes_total") > value(before, "corral_proxy_received_bytes_total")
    assert value(after, "corral_proxy_sent_bytes_total") > value(before, "corral_proxy_sent_bytes_total")


def test_every_api_answer_has_a_request_id_and_an_error_names_it(server, key):
    ok = httpx.get(f"{server.url}/v2/sandboxes", headers={"X-API-KEY": key["key"]})
    assert ok.status_code == 200 and len(ok.headers["X-Request-ID"]) >= 16
    missing = httpx.get(f"{server.url}/sandboxes/nosuchsandbox", headers={"X-API-KEY": key["key"],
                                                                         "X-Request-ID": "obs-404-check"})
    assert missing.status_code == 404
    assert missing.json() == {"code": 404, "message": "sandbox nosuchsandbox not found",
                              "requestID": "obs-404-check"}
    assert missing.headers["X-Request-ID"] == "obs-404-check"


def _log_entries(server) -> list[dict]:
    return [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]


def test_server_log_lines_are_json_and_carry_the_request_id(server, key):
    httpx.get(f"{server.url}/sandboxes/nosuchsandbox", headers={"X-API-KEY": key["key"],
                                                              "X-Request-ID": "obs-log-check"})
    # The access line is written as the answer goes out: the client can have it a moment before the file.
    deadline = time.monotonic() + 10
    while not [e for e in _log_entries(server) if e.get("requestID") == "obs-log-check"]:
        assert time.monotonic() < deadline, "no access log line with the request's id"
        time.sleep(0.05)
    entries = _log_entries(server)
    (access,) = [e for e in entries if e.get("requestID") == "obs-log-check"]
    assert (access["logger"], access["level"], access["http"]["status"]) == ("corral.access", "info", 404)
    assert {"ts", "level", "logger", "message"} <= access.keys()
    # uvicorn's own lines are JSON too (it would otherwise keep its own format)
    assert any(e["logger"].startswith("uvicorn") for e in entries)


def test_the_logs_endpoint_shows_the_console_and_the_start_log(server, key, sandbox):
    # What init's console gets (envd's own output goes there) and a start command's log.
    sandbox.commands.run("echo console-marker-1 > /proc/1/fd/1", user="root")
    sandbox.commands.run("mkdir -p /var/log/corral && echo start-marker-1 >> /var/log/corral/start.log",
                         user="root")
    answer = httpx.get(f"{server.url}/sandboxes/{sandbox.sandbox_id}/logs", headers={"X-API-KEY": key["key"]})
    assert answer.status_code == 200, answer.text
    entries = answer.json()["logEntries"]
    assert {"message": "console-marker-1", "source": "runtime"} in [
        {"message": e["message"], "source": e["fields"]["source"]} for e in entries]
    assert [e["message"] for e in entries if e["fields"]["source"] == "start"] == ["start-marker-1"]
    assert [entry["line"] for entry in answer.json()["logs"]] == [e["message"] for e in entries]


def test_cli_sandbox_logs_prints_them(server, key, sandbox):
    sandbox.commands.run("mkdir -p /var/log/corral && echo cli-marker >> /var/log/corral/start.log", user="root")
    printed = server.cli("sandbox", "logs", sandbox.sandbox_id, "--url", server.url, "--api-key", key["key"])
    assert "cli-marker" in printed.splitlines()


def test_cli_sandbox_logs_follow_prints_new_lines_and_ends_with_the_sandbox(server, key, opts):
    sbx = Sandbox.create(TEMPLATE, **opts)
    sbx.commands.run("mkdir -p /var/log/corral && echo first-line >> /var/log/corral/start.log", user="root")
    follower = subprocess.Popen([*CLI, "sandbox", "logs", sbx.sandbox_id, "--follow", "--every", "0.5", "--url",
                                 server.url, "--api-key", key["key"]], env=server.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline().strip() == "first-line"
        sbx.commands.run("echo second-line >> /var/log/corral/start.log", user="root")
        assert follower.stdout.readline().strip() == "second-line"
        sbx.kill()
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0
        assert out == "" and f"sandbox {sbx.sandbox_id} is gone" in err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        sbx.kill()


def test_the_server_log_names_no_api_key(server, key):
    assert key["key"] not in server.log.read_text()
