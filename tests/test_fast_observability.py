"""What an operator sees, on the fake runtime without root: /metrics (read from the control plane, the
capacity manager and the proxy when scraped), who may scrape it, request ids in headers, error bodies and
log lines, and the sandbox logs endpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time
from types import SimpleNamespace

import aiohttp.web
import httpx
import pytest
from helpers.fast import TEMPLATE, platform, stocked
from prometheus_client.parser import text_string_to_metric_families

from corral.config import PlatformSettings
from corral.control.keys import ApiKeys
from corral.observability.logs import JsonFormatter, request_id_for
from corral.observability.metrics import ServerMetrics
from corral.orchestrator import capacity
from corral.proxy.proxy import SandboxProxy
from corral.runtime.base import ExecResult, SandboxFailed

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_refills(monkeypatch):
    monkeypatch.setattr(capacity, "REFILL_DELAY_S", 0.01)


SETTINGS = PlatformSettings(database_url="", pool_size=0, pool_templates=(), prepared_pool_size=0, resume_warm_s=0,
                            resume_warm_max=4, max_timeout_s=0, metrics_interval_s=3600, metrics_kept=10,
                            idle_freeze_s=0, idle_fresh_s=0, idle_breathe_every_s=10, metrics_token="",
                            metrics_public=False)


@contextlib.asynccontextmanager
async def served(tmp_path, settings: PlatformSettings = SETTINGS, client=("127.0.0.1", 40000), **options):
    """The API over a started control plane on the fake runtime: (HTTP client, plane, fake runtime, headers
    with an API key, the key's id)."""
    async with platform(tmp_path, settings, client=client, runtime_options=options) as served:
        key, secret = await served.keys.create("observability")
        yield served.http, served.plane, served.fake, {"X-API-KEY": secret}, key


async def scrape(http: httpx.AsyncClient, **headers) -> dict[str, list]:
    """Metric family name -> its samples, parsed with Prometheus's own text parser."""
    answer = await http.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(answer.text)}


def value(families: dict, sample: str, **labels) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    found = [s.value for s in families[family] if s.name == sample and s.labels == labels]
    assert len(found) == 1, f"{sample}{labels} in {families[family]}"
    return found[0]


async def create(http, headers) -> str:
    answer = await http.post("/v2/sandboxes", json={"templateID": TEMPLATE}, headers=headers)
    assert answer.status_code == 201, answer.text
    return answer.json()["sandboxID"]


# --- /metrics ------------------------------------------------------------------------------------------


async def test_sandbox_gauges_follow_creates_and_kills(tmp_path):
    async with served(tmp_path) as (http, _, _, headers, _):
        before = await scrape(http)
        assert not [s for s in before["corral_sandboxes"] if s.value]
        first, _ = await create(http, headers), await create(http, headers)
        assert value(await scrape(http), "corral_sandboxes", state="running", template=TEMPLATE) == 2
        assert (await http.delete(f"/sandboxes/{first}", headers=headers)).status_code == 204
        assert value(await scrape(http), "corral_sandboxes", state="running", template=TEMPLATE) == 1


async def test_creates_are_counted_per_key_and_timed(tmp_path):
    async with served(tmp_path) as (http, _, _, headers, key):
        await create(http, headers)
        await create(http, headers)
        refused = await http.post("/v2/sandboxes", json={"templateID": "no-such-template"}, headers=headers)
        assert refused.status_code == 404
        families = await scrape(http)
        assert value(families, "corral_sandbox_creates_total", key_id=key.id, outcome="ok") == 2
        assert value(families, "corral_sandbox_creates_total", key_id=key.id, outcome="error") == 1
        assert value(families, "corral_sandbox_create_seconds_count") == 2
        assert value(families, "corral_sandbox_create_seconds_sum") > 0


async def test_resume_and_fork_latencies_are_observed(tmp_path):
    async with served(tmp_path) as (http, plane, _, headers, key):
        sandbox_id = await create(http, headers)
        await plane.branching.pause(key.owner, sandbox_id)
        assert value(await scrape(http), "corral_sandboxes", state="paused", template=TEMPLATE) == 1
        await plane.branching.resume(key.owner, sandbox_id, timeout=None)
        await plane.branching.fork(key.owner, sandbox_id, count=2, timeout=None)
        families = await scrape(http)
        assert value(families, "corral_sandbox_resume_seconds_count") == 1
        assert value(families, "corral_sandbox_fork_seconds_count") == 1
        assert value(families, "corral_sandboxes", state="running", template=TEMPLATE) == 3


async def test_pool_levels_are_read_from_the_capacity_manager(tmp_path, monkeypatch):
    async with served(tmp_path, pool_size=2, pool_templates=(TEMPLATE,)) as (http, plane, _, headers, _):
        await stocked(plane.orchestrator, ready=2)
        assert value(await scrape(http), "corral_pool_ready_sandboxes", template=TEMPLATE) == 2
        monkeypatch.setattr(capacity, "REFILL_DELAY_S", 60)  # no refill between the claim and the scrape
        await create(http, headers)  # claims one
        assert value(await scrape(http), "corral_pool_ready_sandboxes", template=TEMPLATE) == 1


async def test_a_failed_restore_is_counted(tmp_path):
    async with served(tmp_path) as (http, _, fake, headers, _):
        fake.fail_next("start", SandboxFailed("restoring checkpoint failed: x"))
        answer = await http.post("/v2/sandboxes", json={"templateID": TEMPLATE}, headers=headers)
        assert answer.status_code == 500
        families = await scrape(http)
        assert value(families, "corral_restore_failures_total", container="new") == 1
        assert value(families, "corral_restore_failures_total", container="prepared") == 0


async def test_template_builds_are_counted_by_result():
    metrics = ServerMetrics()
    metrics.build_finished(True, 42.0)
    metrics.build_finished(False, 3.0)
    families = {f.name: f.samples for f in text_string_to_metric_families(
        (await metrics.render(_empty_plane())).decode())}
    assert value(families, "corral_template_builds_total", result="ready") == 1
    assert value(families, "corral_template_builds_total", result="error") == 1
    assert value(families, "corral_template_build_seconds_sum") == 45.0


def _empty_plane():
    async def counts():
        return {}
    capacity_ = SimpleNamespace(ready_templates=(), ready=lambda t: 0, prepared_ids=set, resume_ready=lambda: 0,
                                restore_failures={})
    return SimpleNamespace(sandboxes=SimpleNamespace(count_by_state_and_template=counts),
                           orchestrator=SimpleNamespace(capacity=capacity_))


async def test_the_proxy_counts_requests_by_status_class_and_bytes_both_ways(tmp_path):
    async def echo(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=b"pong:" + await request.read())

    web = aiohttp.web.Application()
    web.router.add_post("/echo", echo)
    runner = aiohttp.web.AppRunner(web)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]

    async def resolve(sandbox_id: str) -> str | None:
        return "127.0.0.1" if sandbox_id == "alive" else None

    proxy = SandboxProxy(resolve)

    async def app(scope, receive, send):
        await proxy(scope, receive, send, scope["headers"] and dict(scope["headers"])[b"x-sandbox"].decode(), port)

    metrics = ServerMetrics()
    metrics.proxy = proxy.traffic
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as client:
            for _ in range(3):
                answer = await client.post("/echo", content=b"ping", headers={"x-sandbox": "alive"})
                assert answer.content == b"pong:ping"
            assert (await client.post("/echo", headers={"x-sandbox": "gone"})).status_code == 502
        families = {f.name: f.samples for f in text_string_to_metric_families(
            (await metrics.render(_empty_plane())).decode())}
        assert value(families, "corral_proxy_requests_total", status_class="2xx") == 3
        assert value(families, "corral_proxy_requests_total", status_class="5xx") == 1
        assert value(families, "corral_proxy_received_bytes_total") == 3 * len(b"ping")
        assert value(families, "corral_proxy_sent_bytes_total") > 3 * len(b"pong:ping")  # and the 502's body
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_metrics_never_label_by_sandbox_id(tmp_path):
    async with served(tmp_path) as (http, _, _, headers, _):
        sandbox_id = await create(http, headers)
        assert sandbox_id not in (await http.get("/metrics")).text


# --- who may scrape ------------------------------------------------------------------------------------


async def test_metrics_are_refused_to_a_remote_client_by_default(tmp_path):
    async with served(tmp_path, client=("192.0.2.7", 40000)) as (http, *_):
        answer = await http.get("/metrics")
        assert answer.status_code == 403
        assert "CORRAL_METRICS_TOKEN" in answer.json()["message"]


async def test_metrics_with_a_token_need_it_even_on_loopback(tmp_path):
    settings = dataclasses.replace(SETTINGS, metrics_token="scrape-secret")
    async with served(tmp_path, settings) as (http, *_):
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        await scrape(http, Authorization="Bearer scrape-secret")


async def test_public_metrics_answer_anyone(tmp_path):
    settings = dataclasses.replace(SETTINGS, metrics_public=True)
    async with served(tmp_path, settings, client=("192.0.2.7", 40000)) as (http, *_):
        await scrape(http)


async def test_an_api_key_does_not_open_metrics_to_a_remote_client(tmp_path):
    async with served(tmp_path, client=("192.0.2.7", 40000)) as (http, _, _, headers, _):
        assert (await http.get("/metrics", headers=headers)).status_code == 403


# --- request ids ---------------------------------------------------------------------------------------


async def test_every_answer_carries_a_request_id(tmp_path):
    async with served(tmp_path) as (http, *_):
        first, second = await http.get("/health"), await http.get("/health")
        assert first.status_code == 200
        assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


async def test_a_sane_incoming_request_id_is_kept(tmp_path):
    async with served(tmp_path) as (http, *_):
        answer = await http.get("/health", headers={"X-Request-ID": "trace-42.a:b"})
        assert answer.headers["X-Request-ID"] == "trace-42.a:b"


def test_an_insane_incoming_request_id_is_replaced():
    for incoming in ("", "with space", "x" * 200, "line\nbreak", '"quoted"', "-leading-dash"):
        assert request_id_for(incoming) != incoming
    assert request_id_for(None)


async def test_an_error_body_names_the_request_id(tmp_path):
    async with served(tmp_path) as (http, _, _, headers, _):
        answer = await http.get("/sandboxes/nope", headers={**headers, "X-Request-ID": "find-me"})
        assert answer.status_code == 404
        assert answer.json() == {"code": 404, "message": "sandbox nope not found", "requestID": "find-me"}
        assert answer.headers["X-Request-ID"] == "find-me"
        unauthenticated = await http.get("/v2/sandboxes")
        assert unauthenticated.json()["requestID"] == unauthenticated.headers["X-Request-ID"]
        invalid = await http.post("/v2/sandboxes", json={}, headers=headers)
        assert invalid.status_code == 400 and invalid.json()["requestID"] == invalid.headers["X-Request-ID"]


async def test_log_lines_written_during_a_request_name_its_id_in_json(tmp_path):
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("corral.access")
    access.addHandler(handler)
    access.setLevel(logging.DEBUG)
    try:
        async with served(tmp_path) as (http, _, _, headers, _):
            await http.get("/sandboxes/nope", headers={**headers, "X-Request-ID": "logged-one"})
    finally:
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    (entry,) = [e for e in entries if e.get("requestID") == "logged-one"]
    assert (entry["level"], entry["logger"]) == ("info", "corral.access")
    assert entry["http"] == {**entry["http"], "method": "GET", "path": "/sandboxes/nope", "status": 404}
    assert entry["ts"].endswith("Z") and "GET /sandboxes/nope 404" in entry["message"]


def test_a_json_log_line_outside_a_request_has_no_request_id():
    record = logging.LogRecord("corral.x", logging.WARNING, __file__, 1, "plain %s", ("words",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry == {"ts": entry["ts"], "level": "warning", "logger": "corral.x", "message": "plain words"}


# --- sandbox logs --------------------------------------------------------------------------------------


def _printing(fake, console: bytes, start_log: bytes | None, written: float) -> None:
    fake.output = lambda sandbox_id, max_bytes=0: (console, written)
    fake.exec_result = (ExecResult(0, f"{int(written)}\n".encode() + start_log, b"") if start_log is not None
                        else ExecResult(3, b"", b""))


async def test_sandbox_logs_hold_the_console_then_the_start_commands_log(tmp_path):
    async with served(tmp_path) as (http, _, fake, headers, _):
        sandbox_id = await create(http, headers)
        written = time.time()
        _printing(fake, b"envd listening\nWARNING: low memory\n", b"server up on 8080\n", written)
        answer = await http.get(f"/sandboxes/{sandbox_id}/logs", headers=headers)
        assert answer.status_code == 200
        body = answer.json()
        assert [e["line"] for e in body["logs"]] == ["envd listening", "WARNING: low memory", "server up on 8080"]
        assert [(e["level"], e["fields"]) for e in body["logEntries"]] == [
            ("info", {"source": "runtime", "line": "1"}), ("warn", {"source": "runtime", "line": "2"}),
            ("info", {"source": "start", "line": "1"})]


async def test_sandbox_logs_describe_host_paths(tmp_path):
    async with served(tmp_path) as (http, _, fake, headers, _):
        sandbox_id = await create(http, headers)
        _printing(fake, b"W1201 cannot open /var/lib/corral/sandboxes/x/runsc.log\n", None, time.time())
        (entry,) = (await http.get(f"/sandboxes/{sandbox_id}/logs", headers=headers)).json()["logEntries"]
        assert entry["message"] == "W1201 cannot open a path on the server" and entry["level"] == "warn"


async def test_sandbox_logs_v1_start_and_limit(tmp_path):
    async with served(tmp_path) as (http, _, fake, headers, _):
        sandbox_id = await create(http, headers)
        written = time.time()
        _printing(fake, b"one\ntwo\nthree\n", None, written)
        limited = await http.get(f"/sandboxes/{sandbox_id}/logs", params={"limit": 2}, headers=headers)
        assert [e["line"] for e in limited.json()["logs"]] == ["one", "two"]
        later = await http.get(f"/sandboxes/{sandbox_id}/logs", params={"start": int(written * 1000) + 1000},
                               headers=headers)
        assert later.json() == {"logs": [], "logEntries": []}


async def test_sandbox_logs_v2_filter_by_level_and_search_and_go_backward(tmp_path):
    async with served(tmp_path) as (http, _, fake, headers, _):
        sandbox_id = await create(http, headers)
        _printing(fake, b"starting\nERROR: disk full\nWARNING: disk nearly full\n", None, time.time())
        url = f"/v2/sandboxes/{sandbox_id}/logs"
        warned = (await http.get(url, params={"level": "warn"}, headers=headers)).json()["logs"]
        assert [e["message"] for e in warned] == ["ERROR: disk full", "WARNING: disk nearly full"]
        found = (await http.get(url, params={"search": "nearly"}, headers=headers)).json()["logs"]
        assert [e["message"] for e in found] == ["WARNING: disk nearly full"]
        backward = (await http.get(url, params={"direction": "backward", "limit": 1}, headers=headers)).json()
        assert [e["message"] for e in backward["logs"]] == ["WARNING: disk nearly full"]


async def test_sandbox_logs_of_another_keys_sandbox_are_not_found(tmp_path):
    async with served(tmp_path) as (http, plane, _, headers, _):
        sandbox_id = await create(http, headers)
        _, other = await ApiKeys(plane._db).create("other")
        answer = await http.get(f"/sandboxes/{sandbox_id}/logs", headers={"X-API-KEY": other})
        assert answer.status_code == 404
        assert answer.json()["message"] == f"sandbox {sandbox_id} not found"


async def test_a_paused_sandbox_has_no_logs(tmp_path):
    async with served(tmp_path) as (http, plane, fake, headers, key):
        sandbox_id = await create(http, headers)
        _printing(fake, b"envd listening\n", None, time.time())
        await plane.branching.pause(key.owner, sandbox_id)
        answer = await http.get(f"/sandboxes/{sandbox_id}/logs", headers=headers)
        assert answer.json() == {"logs": [], "logEntries": []}
