"""A sandbox's life as the unmodified SDKs see it through a real `corral serve`: what a streaming command or
`run_code` gets when its sandbox is killed or times out under it, and `Sandbox.list`'s filters."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox, SandboxNotRunningException, SandboxQuery
from e2b_code_interpreter import Sandbox as CodeSandbox
from e2b_code_interpreter import TimeoutException

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t9", "10.231.0.0/22"
TEMPLATE = "code-interpreter-v1"
# The SDKs' own words for a request whose sandbox died under it (e2b's envd RPC mapping after its health
# probe; e2b-code-interpreter's `_handle_connection_error`).
COMMAND_KILLED = "The sandbox was killed or reached its end of life while the request was in flight"
RUN_CODE_KILLED = "The sandbox was killed while the request was in progress"
# "Within a couple of seconds", with room for a loaded machine; a client timeout would take minutes.
ENDS_WITHIN_S = 10


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    harness.run(store.build(TEMPLATE, runtime), timeout=3600)
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_POOL_TEMPLATES": TEMPLATE})
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def opts(server):
    key = server.cli("keys", "create", "--name", "lifecycle").strip()
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def streaming(call: Callable[[Callable[..., None]], object]) -> Future:
    """Runs `call(started)` in a thread and returns once it called `started` (its stream is open). The
    future's result is (the exception the call raised or None, when it returned or raised)."""
    started = threading.Event()

    def run() -> tuple[BaseException | None, float]:
        try:
            call(lambda *_: started.set())
        except Exception as e:
            return e, time.monotonic()
        return None, time.monotonic()

    future = ThreadPoolExecutor(1, thread_name_prefix="streaming").submit(run)
    assert started.wait(60), future.exception() if future.done() else "the stream did not start"
    return future


def long_command(sbx: Sandbox) -> Future:
    return streaming(lambda started: sbx.commands.run("echo started; sleep 600", timeout=0, on_stdout=started))


def long_execution(sbx: CodeSandbox) -> Future:
    return streaming(lambda started: sbx.run_code("print('started', flush=True)\nimport time\ntime.sleep(600)",
                                                  timeout=0, on_stdout=started))


def assert_ended_soon_with(running: Future, since: float, kind: type[Exception], words: str) -> None:
    error, ended_at = running.result(timeout=120)
    assert isinstance(error, kind) and words in str(error), repr(error)
    assert ended_at - since < ENDS_WITHIN_S


def test_command_streaming_when_its_sandbox_is_killed_raises_sandbox_not_running(opts):
    sbx = Sandbox.create(TEMPLATE, timeout=120, **opts)
    running = long_command(sbx)
    killed_at = time.monotonic()
    assert Sandbox.kill(sbx.sandbox_id, **opts) is True  # another client, as an operator's script would
    assert_ended_soon_with(running, killed_at, SandboxNotRunningException, COMMAND_KILLED)


def test_command_streaming_when_its_sandbox_times_out_raises_sandbox_not_running(opts):
    sbx = Sandbox.create(TEMPLATE, timeout=120, **opts)
    running = long_command(sbx)
    sbx.set_timeout(1)
    assert_ended_soon_with(running, time.monotonic() + 1, SandboxNotRunningException, COMMAND_KILLED)


def test_run_code_when_its_sandbox_is_killed_raises_sandbox_killed(opts):
    sbx = CodeSandbox.create(TEMPLATE, timeout=120, **opts)
    running = long_execution(sbx)
    killed_at = time.monotonic()
    assert sbx.kill() is True  # the same sandbox object, from another thread
    assert_ended_soon_with(running, killed_at, TimeoutException, RUN_CODE_KILLED)


def test_run_code_when_its_sandbox_times_out_raises_sandbox_killed(opts):
    sbx = CodeSandbox.create(TEMPLATE, timeout=120, **opts)
    running = long_execution(sbx)
    sbx.set_timeout(1)
    assert_ended_soon_with(running, time.monotonic() + 1, TimeoutException, RUN_CODE_KILLED)


def test_js_sdk_command_and_run_code_when_their_sandbox_is_killed(server, opts, monkeypatch):
    from tests.helpers.node import run_script

    for name, value in server.sdk_env(opts["api_key"]).items():
        monkeypatch.setenv(name, value)
    result = run_script("lifecycle.mjs")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert [line for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "ok command killed", "ok runCode killed"]


@pytest.fixture
def local_time_zone(monkeypatch):
    """A local time zone other than UTC: the SDK sends `started_after` in local time with its offset."""
    monkeypatch.setenv("TZ", "IST-05:30")  # POSIX form of UTC+05:30: needs no zoneinfo files
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_list_started_after_is_inclusive_of_a_start_time_read_back_from_the_api(opts, local_time_zone):
    tag = str(time.time())
    made = [Sandbox.create(TEMPLATE, metadata={"batch": tag}, timeout=120, **opts) for _ in range(3)]
    try:
        started = [sbx.get_info().started_at for sbx in made]
        for i, started_at in enumerate(started):
            query = SandboxQuery(metadata={"batch": tag}, started_after=started_at)
            listed = Sandbox.list(query=query, order="asc", **opts).next_items()
            assert [s.sandbox_id for s in listed] == [sbx.sandbox_id for sbx in made[i:]]
        later = SandboxQuery(metadata={"batch": tag}, started_after=started[-1] + dt.timedelta(seconds=1))
        assert Sandbox.list(query=later, **opts).next_items() == []
    finally:
        for sbx in made:
            sbx.kill()


def test_list_started_after_without_a_utc_offset_is_400(server, opts):
    answer = httpx.get(f"{server.url}/v2/sandboxes", params={"startedAfter": "2026-01-02T15:04:05"},
                       headers={"X-API-KEY": opts["api_key"]})
    assert answer.status_code == 400
    assert answer.json() == {"code": 400, "message": "startedAfter must carry a UTC offset ('Z' or e.g. "
                                                     "'+02:00'), got '2026-01-02T15:04:05'",
                             "requestID": answer.headers["x-request-id"]}


def test_list_malformed_metadata_is_400(server, opts):
    answer = httpx.get(f"{server.url}/v2/sandboxes", params={"metadata": "owner"},
                       headers={"X-API-KEY": opts["api_key"]})
    assert answer.status_code == 400
    assert answer.json()["message"].startswith("metadata must be key=value pairs joined by '&'")
