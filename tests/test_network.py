"""Network isolation: what a sandbox can and cannot reach. Traffic goes only to loopback and to test
hosts in namespaces these tests create."""

from __future__ import annotations

import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import DNS_ANSWER, DNS_HOST_ADDRESS
from helpers.testnet import TestHost, sh

from corral.network.firewall import METADATA_ADDRESS, table_name
from corral.runtime.base import SandboxConfig


def curl(harness, runtime, sandbox_id: str, url: str) -> tuple[int, str]:
    r = harness.run(runtime.exec(sandbox_id, ["curl", "-sS", "--max-time", "3", url], timeout=30))
    return r.exit_code, (r.stdout + r.stderr).decode()


@pytest.fixture(scope="module")
def lan_host():
    host = TestHost("lan", "10.99.0.1").up()
    host.serve_http(8080)
    yield host
    host.down()


@pytest.fixture(scope="module")
def internet_host():
    # 203.0.113.0/24 is TEST-NET-3: not a private range, so it stands in for "the internet".
    host = TestHost("inet", "203.0.113.1").up()
    host.serve_http(8080)
    yield host
    host.down()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host service\n")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def host_service():
    server = HTTPServer(("0.0.0.0", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_egress_reaches_internet_host(harness, runtime, sandbox_factory, internet_host):
    sb = sandbox_factory()
    code, out = curl(harness, runtime, sb.id, "http://203.0.113.1:8080/")
    assert code == 0, out
    assert "hello from inet" in out


def test_egress_refused_when_internet_is_off(harness, runtime, sandbox_factory, internet_host):
    sb = sandbox_factory(SandboxConfig(internet=False))
    code, out = curl(harness, runtime, sb.id, "http://203.0.113.1:8080/")
    assert code != 0
    assert "hello" not in out


def test_private_range_blocked_for_sandbox_but_reachable_from_host(harness, runtime, sandbox_factory, lan_host):
    host_probe = sh("curl", "-sS", "--max-time", "3", "http://10.99.0.1:8080/", check=False)
    assert "hello from lan" in host_probe.stdout
    sb = sandbox_factory()
    code, out = curl(harness, runtime, sb.id, "http://10.99.0.1:8080/")
    assert code != 0
    assert "hello" not in out


def test_host_services_unreachable_on_any_host_address(harness, runtime, sandbox_factory, host_service,
                                                       internet_host):
    sb = sandbox_factory()
    gateway = str(runtime.table.get(sb.id).slot.gateway)
    for address in (gateway, "203.0.113.254", DNS_HOST_ADDRESS.rsplit(".", 1)[0] + ".254"):  # host ends of the veths
        code, out = curl(harness, runtime, sb.id, f"http://{address}:{host_service}/")
        assert code != 0, f"sandbox reached the host service at {address}: {out}"
    # 127.0.0.1 inside a sandbox is the sandbox's own loopback, not the host's.
    code, out = curl(harness, runtime, sb.id, f"http://127.0.0.1:{host_service}/")
    assert "host service" not in out


def test_sandboxes_cannot_reach_each_other_but_host_can(harness, runtime, sandbox_factory):
    server = sandbox_factory()
    client = sandbox_factory()
    harness.run(runtime.exec(server.id, ["sh", "-c",
        "nohup python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 &"]))
    host, port = runtime.address(server.id, 8000)
    for _ in range(100):
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            break
        except OSError:
            harness.run(__import__("asyncio").sleep(0.05))
    probe = sh("curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}", f"http://{host}:{port}/",
               check=False)
    assert probe.stdout == "200"
    code, out = curl(harness, runtime, client.id, f"http://{host}:{port}/")
    assert code != 0, out


def test_dns_resolves_through_runtime_resolver(harness, runtime, sandbox_factory):
    sb = sandbox_factory()
    r = harness.run(runtime.exec(sb.id, ["python3", "-c",
                                         "import socket; print(socket.gethostbyname('anything.corral.test'))"]))
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().strip() == DNS_ANSWER


def test_dns_refused_when_internet_is_off(harness, runtime, sandbox_factory):
    sb = sandbox_factory(SandboxConfig(internet=False))
    r = harness.run(runtime.exec(sb.id, ["python3", "-c",
                                         "import socket; socket.setdefaulttimeout(3); "
                                         "print(socket.gethostbyname('anything.corral.test'))"], timeout=60))
    assert r.exit_code != 0


def test_metadata_address_and_link_local_are_dropped_in_ruleset(runtime, settings):
    ruleset = subprocess.run(["nft", "list", "table", "inet", table_name(settings.instance)],
                             capture_output=True, text=True, check=True).stdout
    assert f"ip daddr {METADATA_ADDRESS}" in ruleset and "drop" in ruleset.split(METADATA_ADDRESS)[1].splitlines()[0]
    for cidr in ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"):
        assert cidr in ruleset


def test_each_sandbox_has_its_own_network_namespace(harness, runtime, sandbox_factory):
    a, b = sandbox_factory(), sandbox_factory()
    assert a.address != b.address
    ra = harness.run(runtime.exec(a.id, ["cat", "/proc/net/dev"]))
    assert b"eth0" in ra.stdout


def test_opening_the_runtime_leaves_no_seal_on_the_sandboxes(runtime, settings):
    """While the runtime is opened the instance's sandboxes are held by a seal table until their rules are
    back (network/firewall.py `seal`); once it is open, the seal is gone."""
    import subprocess

    from corral.network.firewall import table_name

    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert f"{table_name(settings.instance)}_seal" not in tables
    assert table_name(settings.instance) in tables
