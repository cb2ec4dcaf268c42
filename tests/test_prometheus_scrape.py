"""A real Prometheus (Debian's `prometheus`, 2.42 in bookworm) scrapes a real `corral serve` with the scrape
config docs/operations.md gives, and its queries see the server's series move as the SDK creates and kills
a sandbox. Outside the default run (`-m prometheus`): the package is ~100 MB that the default install does
not need. Install it without starting its service: `apt-get install --no-install-recommends prometheus`
(with a policy-rc.d that refuses service starts), then
`scripts/test.sh -m prometheus tests/test_prometheus_scrape.py`."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox

from tests.helpers.server import ServerProcess, free_port

pytestmark = pytest.mark.prometheus
INSTANCE, NETWORK = "t23", "10.248.0.0/22"
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def server(harness, runtime):
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_METERING_INTERVAL_S": "1"})
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.fail("Debian's prometheus is not installed (apt-get install --no-install-recommends prometheus); "
                    "this test runs only when asked for with -m prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    # The scrape config of docs/operations.md, with this server's port and a 1 s interval.
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: corral\n"
                      f"    static_configs:\n      - targets: [\"127.0.0.1:{server.port}\"]\n")
    port = free_port()
    with open(root / "prometheus.log", "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"prometheus did not start: {(root / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(prometheus: str, expr: str, check, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(prometheus, expr)
        if check(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{expr}: {result}")
        time.sleep(0.5)


def test_prometheus_scrapes_the_server_and_sees_sandboxes_and_usage_move(server, prometheus):
    wait_for(prometheus, 'up{job="corral"}', lambda r: r and r[0]["value"][1] == "1")
    key = server.cli("keys", "create", "--name", "prometheus").strip()
    sbx = Sandbox.create(timeout=120, api_url=server.url, sandbox_url=server.url, api_key=key)
    try:
        wait_for(prometheus, 'sum(corral_sandboxes{state="running",template="base"})',
                 lambda r: r and float(r[0]["value"][1]) >= 1)
        wait_for(prometheus, 'sum(corral_sandbox_creates_total{outcome="ok"})',
                 lambda r: r and float(r[0]["value"][1]) >= 1)
        wait_for(prometheus, "sum(corral_team_vcpu_seconds_total)", lambda r: r and float(r[0]["value"][1]) > 0)
        wait_for(prometheus, "histogram_quantile(0.5, sum by (le) (corral_sandbox_create_seconds_bucket))",
                 lambda r: r and float(r[0]["value"][1]) > 0)
    finally:
        sbx.kill()
    wait_for(prometheus, 'sum(corral_sandboxes{state="running",template="base"}) or vector(0)',
             lambda r: r and float(r[0]["value"][1]) == 0)
