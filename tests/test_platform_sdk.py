"""The platform end to end: a real `corral serve` driven by the unmodified `e2b` Python SDK."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t3", "10.204.0.0/22"


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, host="0.0.0.0")
    with proc.serving(wait_pool=2, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def key(server):
    return server.cli("keys", "create", "--name", "tests").strip()


@pytest.fixture
def opts(server, key):
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def test_create_run_files_info_and_kill(opts):
    sbx = Sandbox.create(metadata={"purpose": "e2e"}, envs={"GREETING": "hi"}, timeout=120, **opts)
    try:
        assert sbx.commands.run("echo $GREETING from $(whoami) in $PWD").stdout == "hi from user in /home/user\n"
        assert sbx.commands.run("hostname").stdout == f"{sbx.sandbox_id}\n"
        sbx.files.write("notes.txt", "kept")
        assert sbx.files.read("/home/user/notes.txt") == "kept"
        # Signed URLs carry no routing headers: the server finds the sandbox by its signature.
        assert httpx.get(sbx.download_url("notes.txt", use_signature_expiration=30)).text == "kept"
        upload = sbx.upload_url("/home/user/up.txt")
        assert httpx.post(upload, files={"file": ("up.txt", b"uploaded")}).status_code == 200
        assert sbx.files.read("/home/user/up.txt") == "uploaded"
        assert httpx.get(sbx.download_url("notes.txt").replace("signature=v1_", "signature=v1_x")).status_code == 404
        info = sbx.get_info()
        assert info.metadata == {"purpose": "e2e"} and info.state == SandboxState.RUNNING
        assert info.template_id == "base" and info.envd_version == "0.6.4"
        assert 110 <= (info.end_at - info.started_at).total_seconds() <= 121
        assert sbx.is_running()
    finally:
        assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id, **opts) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **opts)


def test_list_filters_and_exact_pages(opts):
    tag = str(time.time())
    made = [Sandbox.create(metadata={"batch": tag, "n": str(i)}, **opts) for i in range(3)]
    try:
        query = SandboxQuery(metadata={"batch": tag})
        everything = Sandbox.list(query=query, **opts).next_items()
        assert sorted(s.sandbox_id for s in everything) == sorted(s.sandbox_id for s in made)
        pages, paginator = [], Sandbox.list(query=query, limit=1, **opts)
        while paginator.has_next:
            pages.append(paginator.next_items())
        assert [len(p) for p in pages] == [1, 1, 1]
        assert [p[0].sandbox_id for p in pages] == [s.sandbox_id for s in reversed(made)]  # newest first
        one = Sandbox.list(query=SandboxQuery(metadata={"batch": tag, "n": "1"}), **opts).next_items()
        assert [s.sandbox_id for s in one] == [made[1].sandbox_id]
    finally:
        for sbx in made:
            sbx.kill()


def test_timeout_expiry_and_set_timeout(opts):
    short = Sandbox.create(timeout=2, **opts)
    longer = Sandbox.create(timeout=2, **opts)
    longer.set_timeout(30)
    time.sleep(3.2)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(short.sandbox_id, **opts)
    assert longer.commands.run("echo alive").stdout == "alive\n"
    with pytest.raises(Exception) as info:
        short.commands.run("echo gone")
    assert "not found" in str(info.value).lower() or "not running" in str(info.value).lower()
    longer.kill()


def test_connect_extends_timeout(opts):
    sbx = Sandbox.create(timeout=5, **opts)
    again = Sandbox.connect(sbx.sandbox_id, timeout=60, **opts)
    assert again.commands.run("echo same").stdout == "same\n"
    assert (again.get_info().end_at - again.get_info().started_at).total_seconds() > 50
    sbx.kill()


def test_bad_keys_and_other_keys_sandboxes(server, opts):
    with pytest.raises(AuthenticationException):
        Sandbox.create(**{**opts, "api_key": "e2b_" + "f" * 40})
    with pytest.raises(AuthenticationException):
        Sandbox.list(**{**opts, "api_key": "not-a-key"}).next_items()
    mine = Sandbox.create(**opts)
    other_key = server.cli("keys", "create", "--name", "other").strip()
    other = {**opts, "api_key": other_key}
    try:
        assert mine.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**other).next_items()]
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(mine.sandbox_id, **other)
        assert Sandbox.kill(mine.sandbox_id, **other) is False
        assert mine.is_running()
    finally:
        mine.kill()


def test_unknown_sandbox_on_api_and_proxy(server, opts):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("i" + "0" * 19, **opts)
    response = httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": "nope", "E2b-Sandbox-Port": "49983"})
    assert response.status_code == 502
    assert response.json() == {"sandboxId": "nope", "message": "The sandbox was not found", "code": 502}


def test_proxy_reaches_user_ports_and_reports_closed_ones(server, opts):
    sbx = Sandbox.create(**opts)
    try:
        sbx.commands.run("mkdir -p /tmp/site && echo served > /tmp/site/index.html")
        sbx.commands.run("cd /tmp/site && python3 -m http.server 8080 --bind 0.0.0.0", background=True,
                         timeout=0)
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8080"}
        for _ in range(100):
            response = httpx.get(f"{server.url}/index.html", headers=headers)
            if response.status_code == 200:
                break
            time.sleep(0.1)
        assert response.text == "served\n"
        closed = httpx.get(f"{server.url}/", headers={**headers, "E2b-Sandbox-Port": "8081"})
        assert closed.status_code == 502 and closed.json()["message"] == "The sandbox is running but port is not open"
        init = httpx.post(f"{server.url}/init", json={"accessToken": "stolen"},
                          headers={**headers, "E2b-Sandbox-Port": "49983"})
        assert init.status_code == 403
    finally:
        sbx.kill()


def test_sandbox_cannot_reach_the_server(server, opts):
    sbx = Sandbox.create(**opts)
    try:
        gateway = sbx.commands.run("ip route | awk '/default/ {print $3}'").stdout.strip()
        assert gateway.startswith("10.204.")
        probe = sbx.commands.run(f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://{gateway}:{server.port}/health"
                                 " || true")
        assert probe.stdout.strip() in ("000", "")
    finally:
        sbx.kill()


def test_metrics_history(opts):
    sbx = Sandbox.create(**opts)
    try:
        deadline = time.monotonic() + 10
        metrics = []
        while time.monotonic() < deadline and len(metrics) < 2:
            time.sleep(0.5)
            metrics = sbx.get_metrics()
        assert len(metrics) >= 2
        assert metrics[-1].mem_total > 0 and metrics[-1].disk_total > 0 and metrics[-1].cpu_count >= 1
        assert metrics[0].timestamp <= metrics[-1].timestamp
    finally:
        sbx.kill()


def test_async_sdk(opts):
    async def scenario():
        sbx = await AsyncSandbox.create(envs={"X": "1"}, **opts)
        try:
            assert (await sbx.commands.run("echo $X")).stdout == "1\n"
            await sbx.files.write("/tmp/a", "b")
            assert await sbx.files.read("/tmp/a") == "b"
            assert (await sbx.get_info()).sandbox_id == sbx.sandbox_id
        finally:
            assert await sbx.kill() is True

    asyncio.run(scenario())


def test_invalid_requests_get_json_errors(server, key):
    headers = {"X-API-KEY": key}
    bad = httpx.post(f"{server.url}/v2/sandboxes", json={"timeout": 10}, headers=headers)
    assert bad.status_code == 400 and set(bad.json()) == {"code", "message", "requestID"}
    missing = httpx.post(f"{server.url}/v2/sandboxes", json={"templateID": "no-such-template"}, headers=headers)
    assert missing.status_code == 404 and "no-such-template" in missing.json()["message"]
    negative = httpx.post(f"{server.url}/sandboxes/x/timeout", json={"timeout": -1}, headers=headers)
    assert negative.status_code == 400
    assert httpx.get(f"{server.url}/v2/sandboxes", params={"state": "sleeping"}, headers=headers).status_code == 400
    assert httpx.get(f"{server.url}/v2/sandboxes", params={"nextToken": "garbage"}, headers=headers).status_code == 400
    nope = httpx.get(f"{server.url}/nope", headers=headers)
    assert nope.json() == {"code": 404, "message": "Not Found", "requestID": nope.headers["x-request-id"]}


def test_server_restart_after_kill_9_keeps_sandboxes(server, opts):
    sbx = Sandbox.create(metadata={"survives": "yes"}, timeout=300, **opts)
    sbx.commands.run("echo before > /home/user/state.txt")
    doomed = Sandbox.create(timeout=4, **opts)
    server.stop(signal.SIGKILL)
    time.sleep(1)
    server.start(wait_pool=1)
    again = Sandbox.connect(sbx.sandbox_id, **opts)
    assert again.commands.run("cat /home/user/state.txt").stdout == "before\n"
    assert again.get_info().metadata == {"survives": "yes"}
    time.sleep(3.5)
    with pytest.raises((SandboxNotFoundException, NotFoundException)):
        Sandbox.get_info(doomed.sandbox_id, **opts)
    again.kill()


def test_cli_talks_to_the_server(server, key):
    import json
    import os
    import sys

    env = {**server.env, "E2B_API_URL": server.url, "E2B_API_KEY": key}
    cli = [sys.executable, "-c", "from corral.cli.main import app; app()"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)

    sandbox_id = run("sandbox", "create", "-m", "via=cli", "-e", "FOO=bar").stdout.strip()
    listed = json.loads(run("sandbox", "ls", "--json", "-m", "via=cli").stdout)
    assert [s["sandboxID"] for s in listed] == [sandbox_id]
    result = run("sandbox", "exec", sandbox_id, "--", "echo $FOO; whoami; exit 4")
    assert result.returncode == 4 and result.stdout == "bar\nuser\n"
    assert run("sandbox", "exec", "--user", "root", sandbox_id, "--", "whoami").stdout == "root\n"
    assert json.loads(run("sandbox", "info", "--json", sandbox_id).stdout)["metadata"] == {"via": "cli"}
    assert run("sandbox", "kill", sandbox_id).returncode == 0
    gone = run("sandbox", "kill", sandbox_id)
    assert gone.returncode == 1 and "not found" in gone.stderr
    assert os.environ.get("E2B_API_KEY") != key  # the CLI read the key from its own environment


def test_revoked_key_is_refused(server, opts):
    import json

    created = json.loads(server.cli("keys", "create", "--name", "short-lived", "--json"))
    listed = json.loads(server.cli("keys", "ls", "--json"))
    assert any(k["id"] == created["id"] and not k["revoked"] for k in listed)
    assert all("key" not in k for k in listed)  # only hashes are stored
    Sandbox.list(**{**opts, "api_key": created["key"]}).next_items()
    server.cli("keys", "revoke", created["id"])
    with pytest.raises(AuthenticationException):
        Sandbox.list(**{**opts, "api_key": created["key"]}).next_items()


# Alone: once in three runs beside the other xdist worker its stateful phase met a 500 (not reproduced since,
# alone or loaded; its message now carries the failure and the server's log); it never failed alone.
@pytest.mark.alone
def test_schema_driven_fuzzing_finds_no_server_errors(server, key):
    """schemathesis generates requests from the served OpenAPI document (valid and invalid ones, with
    coverage, fuzzing and stateful phases); no answer may be a 5xx or break the schema's status codes."""
    import shutil
    import sys
    from pathlib import Path

    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    result = subprocess.run([st, "run", f"{server.url}/openapi.json", "-H", f"X-API-KEY: {key}",
                             "--checks", "not_a_server_error", "-n", "25", "--seed", "1", "--no-color"],
                            capture_output=True, text=True, timeout=600)
    # The failures' section (each with the request to reproduce it), not the summary's tail of warnings.
    failures = result.stdout[result.stdout.find("FAILURES"):result.stdout.find("SUMMARY")]
    assert result.returncode == 0, (f"{failures[:6000] or result.stdout[-4000:]}\nthe server's log:\n"
                                    f"{server.log.read_text()[-6000:]}")
    assert "passed" in result.stdout


def test_js_sdk_end_to_end(server, key):
    import os

    from tests.helpers.node import run_script

    previous = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")}
    os.environ.update(server.sdk_env(key))
    try:
        result = run_script("platform.mjs")
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert [line for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "ok commands", "ok pty", "ok files", "ok list and info", "ok timeout and kill"]


def test_websocket_through_the_proxy_and_host_routing(server, opts):
    from pathlib import Path

    from websockets.sync.client import connect

    sbx = Sandbox.create(**opts)
    try:
        sbx.files.write("/home/user/ws_echo.py", (Path(__file__).parent / "helpers" / "ws_echo.py").read_text())
        sbx.commands.run("python3 /home/user/ws_echo.py 9000", background=True, timeout=0)
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "9000"}
        ws_url = server.url.replace("http://", "ws://") + "/socket"
        for _ in range(100):
            try:
                socket_ = connect(ws_url, additional_headers=headers, open_timeout=2)
                break
            except Exception:
                time.sleep(0.1)
        with socket_:
            socket_.send("hello")
            assert socket_.recv(timeout=5) == "hello"
            socket_.send(b"\x00\x01" * 1000)
            assert socket_.recv(timeout=5) == b"\x00\x01" * 1000
        # Host-style routing: <port>-<sandbox id>.<domain>, as browsers and get_host() use it.
        response = httpx.get(f"{server.url}/health", headers={"Host": f"49983-{sbx.sandbox_id}.{server.domain}"})
        assert response.status_code == 204
        other = httpx.get(f"{server.url}/health", headers={"Host": f"49983-nosuchbox.{server.domain}"})
        assert other.status_code == 502 and other.json()["message"] == "The sandbox was not found"
    finally:
        sbx.kill()


def test_concurrent_creates_get_distinct_sandboxes_past_the_pool(server, opts):
    """Twice the pool's size at once: every create succeeds (pool claims, then direct restores), no
    sandbox is handed out twice, every one has its own token, and the pool refills afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=5) as workers:
        made = list(workers.map(lambda i: Sandbox.create(metadata={"n": str(i)}, **opts), range(5)))
    try:
        assert len({s.sandbox_id for s in made}) == 5
        assert len({s._envd_access_token for s in made}) == 5
        outputs = {s.sandbox_id: s.commands.run("hostname").stdout.strip() for s in made}
        assert outputs == {s.sandbox_id: s.sandbox_id for s in made}
    finally:
        for sbx in made:
            sbx.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(f"{server.url}/health").json()["pooled"]["base"] < 2:
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/health").json()["pooled"]["base"] == 2
