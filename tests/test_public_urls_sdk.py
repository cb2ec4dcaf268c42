"""Public URLs over TLS as a user gets them from `corral serve`: `https://api.<domain>` and
`https://<port>-<sandboxID>.<domain>` with the installation's own CA, where `E2B_DOMAIN` + `E2B_API_KEY`
(and the printed `SSL_CERT_FILE` / `NODE_EXTRA_CA_CERTS`) are all the unmodified SDKs need.

The domain is under `.localhost`, which glibc resolves to 127.0.0.1 and ::1 through libnss-myhostname
(scripts/install.sh); the server listens for HTTPS on 443 of both, as the SDKs reach it only there. One
module at a time uses 443 (tests run one after another)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import DNS_ANSWER, DNS_HOST_ADDRESS, TEST_ROOT
from e2b import CommandExitException, Sandbox
from websockets.sync.client import connect as ws_connect

from corral.proxy.tls import installation_tls
from tests.helpers.node import run_script
from tests.helpers.server import CLI, ServerProcess

INSTANCE, NETWORK = "t7", "10.219.0.0/22"
DOMAIN = "corral-t7.localhost"

SDK_ONLY_DOMAIN = r'''
import json
from e2b import Sandbox
sbx = Sandbox.create()
try:
    sbx.files.write("/home/user/note.txt", "over https")
    print(json.dumps({"id": sbx.sandbox_id, "echo": sbx.commands.run("echo hi from $(hostname)").stdout.strip(),
                      "read": sbx.files.read("/home/user/note.txt"), "host": sbx.get_host(8000),
                      "listed": [s.sandbox_id for s in Sandbox.list().next_items()]}))
finally:
    sbx.kill()
'''


def resolves_here(name: str) -> bool:
    try:
        return bool(socket.getaddrinfo(name, 443))
    except socket.gaierror:
        return False


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    assert resolves_here(f"api.{DOMAIN}"), (
        f"api.{DOMAIN} does not resolve: *.localhost needs libnss-myhostname in /etc/nsswitch.conf "
        "(scripts/install.sh sets it up)")
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         domain=DOMAIN, https_port=443)
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def tls_dir(server) -> Path:
    return Path(server.env["CORRAL_DATA_DIR"]) / "tls"


@pytest.fixture(scope="module")
def key(server) -> str:
    return server.cli("keys", "create", "--name", "public-urls").strip()


@pytest.fixture()
def sandbox(server, key):
    """A sandbox made over plain HTTP (header routing), to test its public URLs from outside the SDK."""
    sbx = Sandbox.create(api_url=server.url, sandbox_url=server.url, api_key=key)
    yield sbx
    sbx.kill()


def clean_env(**extra: str) -> dict[str, str]:
    """What a user's shell would have: no E2B_API_URL / E2B_SANDBOX_URL, no test settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "CORRAL_", "SSL_CERT", "NODE_EXTRA"))}
    return {**env, **extra}


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def get_until(url: str, verify, timeout: float = 15) -> httpx.Response:
    """GET until the sandbox's server has started listening (502 until then)."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url, verify=verify, timeout=10)
        if response.status_code != 502 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_python_sdk_works_with_only_e2b_domain_and_the_printed_cert_file(server, key, tls_dir):
    env = clean_env(E2B_DOMAIN=DOMAIN, E2B_API_KEY=key, SSL_CERT_FILE=str(tls_dir / "ca-bundle.pem"))
    done = subprocess.run([sys.executable, "-c", SDK_ONLY_DOMAIN], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["echo"] == f"hi from {out['id']}"
    assert out["read"] == "over https"
    assert out["host"] == f"8000-{out['id']}.{DOMAIN}"
    assert out["id"] in out["listed"]


def test_without_the_ca_the_sdk_refuses_the_connection(server, key):
    env = clean_env(E2B_DOMAIN=DOMAIN, E2B_API_KEY=key)
    done = subprocess.run([sys.executable, "-c", "from e2b import Sandbox; Sandbox.list().next_items()"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "certificate" in done.stderr.lower() or "tls" in done.stderr.lower(), done.stderr[-2000:]


def test_js_sdk_works_with_only_e2b_domain_and_node_extra_ca_certs(server, key, tls_dir):
    result = run_script("public.mjs", env=clean_env(E2B_DOMAIN=DOMAIN, E2B_API_KEY=key,
                                                    NODE_EXTRA_CA_CERTS=str(tls_dir / "ca.pem")))
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert [line for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "ok create and run", "ok files", "ok host"]


def test_a_sandbox_port_answers_at_its_https_url(sandbox, tls_dir):
    sandbox.files.write("/home/user/site/index.html", "<h1>served from the sandbox</h1>")
    sandbox.commands.run("cd /home/user/site && python3 -m http.server 8000", background=True)
    url = f"https://{sandbox.get_host(8000)}/index.html"
    response = get_until(url, verify=trusting(tls_dir / "ca.pem"))
    assert response.status_code == 200
    assert response.text == "<h1>served from the sandbox</h1>"
    assert response.http_version == "HTTP/1.1"
    # A client that does not trust the installation's CA does not get through.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url, verify=True)


def test_api_answers_at_the_api_name(server, key, tls_dir):
    response = httpx.get(f"https://api.{DOMAIN}/sandboxes", headers={"X-API-Key": key},
                         verify=trusting(tls_dir / "ca.pem"))
    assert response.status_code == 200
    assert isinstance(response.json(), list)
    assert httpx.get(f"https://api.{DOMAIN}/sandboxes", verify=trusting(tls_dir / "ca.pem")).status_code == 401


def test_create_answers_name_the_public_domain(server, key):
    response = httpx.post(f"{server.url}/sandboxes", headers={"X-API-Key": key}, json={"templateID": "base"})
    assert response.status_code == 201, response.text
    sandbox_id = response.json()["sandboxID"]
    try:
        assert response.json()["domain"] == DOMAIN
        detail = httpx.get(f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": key}).json()
        assert detail["domain"] == DOMAIN
    finally:
        httpx.delete(f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": key})


def test_websocket_echo_through_the_public_url(sandbox, tls_dir):
    # The echo server tests/test_platform_sdk.py uses, standard library only.
    sandbox.files.write("/home/user/ws_echo.py", (Path(__file__).parent / "helpers" / "ws_echo.py").read_text())
    sandbox.commands.run("python3 /home/user/ws_echo.py 8765", background=True)
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    url = f"wss://{sandbox.get_host(8765)}/echo"
    deadline = time.monotonic() + 15
    while True:
        try:
            with ws_connect(url, ssl=context, open_timeout=10) as ws:
                for message in ("ping", "x" * 300):
                    ws.send(message)
                    assert ws.recv(timeout=10) == message
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_unknown_sandbox_and_closed_port_are_json_errors(sandbox, tls_dir):
    ca = trusting(tls_dir / "ca.pem")
    missing = httpx.get(f"https://8000-inosuchsandbox00000000.{DOMAIN}/", verify=ca)
    assert missing.status_code == 502
    assert missing.json() == {"sandboxId": "inosuchsandbox00000000", "message": "The sandbox was not found",
                              "code": 502}
    closed = httpx.get(f"https://{sandbox.get_host(8999)}/", verify=ca)
    assert closed.status_code == 502
    assert closed.json()["sandboxId"] == sandbox.sandbox_id


def test_a_first_serve_without_https_options_comes_up_over_http_when_443_is_taken(server):
    """The README's first command on a machine where 443 is someone else's (here: this module's server)."""
    other = ServerProcess("t7y", "10.225.0.0/22", TEST_ROOT / "t7y", dns_upstream=DNS_HOST_ADDRESS, pool_size=0,
                          domain=DOMAIN, https_port=None)
    try:
        other.start()
        assert httpx.get(f"{other.url}/health").status_code == 200
        log = other.log.read_text()
        assert "cannot listen for HTTPS on 127.0.0.1 port 443" in log and "serving without HTTPS" in log
        assert "export E2B_API_URL=http://127.0.0.1:" in log
    finally:
        other.stop()
        other.destroy_everything()


def test_a_second_server_on_the_same_https_port_says_so(server):
    env = {**server.env, "CORRAL_INSTANCE": "t7x", "CORRAL_DATA_DIR": str(TEST_ROOT / "t7x")}
    done = subprocess.run([*CLI, "serve", "--port", "0", "--domain", DOMAIN, "--https-port", "443"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot listen for HTTPS on 127.0.0.1 port 443" in done.stderr
    assert "--https-port 0" in done.stderr


# --- ingress options (network= on create) -------------------------------------------------------------

HEADER_ECHO = r'''
import json
from http.server import BaseHTTPRequestHandler, HTTPServer
class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"host": self.headers.get("Host"), "forwarded": self.headers.get("X-Forwarded-Host"),
                           "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
HTTPServer(("0.0.0.0", 8000), Echo).serve_forever()
'''

HTTPS_SERVER = r'''
import ssl
from http.server import HTTPServer, SimpleHTTPRequestHandler
import functools
server = HTTPServer(("0.0.0.0", 8443), functools.partial(SimpleHTTPRequestHandler, directory="/home/user/tls-site"))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/home/user/cert.pem", "/home/user/key.pem")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
'''


@pytest.fixture()
def sdk_opts(server, key) -> dict:
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def test_traffic_token_sandbox_needs_the_header_on_its_ports_but_not_on_envd(sdk_opts, tls_dir):
    sbx = Sandbox.create(network={"allow_public_traffic": False}, **sdk_opts)
    try:
        token = sbx.traffic_access_token
        assert token
        sbx.commands.run("mkdir -p /home/user/s && echo secret page > /home/user/s/p.txt")  # envd: no token
        sbx.commands.run("cd /home/user/s && python3 -m http.server 8000", background=True)
        url, ca = f"https://{sbx.get_host(8000)}/p.txt", trusting(tls_dir / "ca.pem")
        allowed = {"e2b-traffic-access-token": token}
        deadline = time.monotonic() + 15
        while httpx.get(url, headers=allowed, verify=ca).status_code == 502 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(url, headers=allowed, verify=ca).text == "secret page\n"
        missing = httpx.get(url, verify=ca)
        assert missing.status_code == 403
        assert missing.json() == {"sandboxId": sbx.sandbox_id, "code": 403, "message":
                                  "Sandbox is secured with traffic access token. Token header "
                                  "'e2b-traffic-access-token' is missing"}
        wrong = httpx.get(url, headers={"e2b-traffic-access-token": token + "x"}, verify=ca)
        assert wrong.status_code == 403
        assert wrong.json()["message"].endswith("Provided token in header 'e2b-traffic-access-token' is invalid")
        # A browser gets the same refusal as a page.
        page = httpx.get(url, headers={"Accept": "text/html,application/xhtml+xml"}, verify=ca)
        assert page.status_code == 403 and page.headers["content-type"].startswith("text/html")
        assert "Token header &#x27;e2b-traffic-access-token&#x27; is missing" in page.text
        assert sbx.get_info().network == {"allow_public_traffic": False}
    finally:
        sbx.kill()


def test_public_sandboxes_have_no_traffic_token(sandbox):
    assert sandbox.traffic_access_token is None


def test_forks_get_their_own_traffic_token(sdk_opts, tls_dir):
    sbx = Sandbox.create(network={"allow_public_traffic": False}, **sdk_opts)
    try:
        response = httpx.post(f"{sdk_opts['api_url']}/sandboxes/{sbx.sandbox_id}/fork", json={"count": 1},
                              headers={"X-API-Key": sdk_opts["api_key"]})
        assert response.status_code in (200, 201), response.text
        fork = response.json()[0]["sandbox"] if isinstance(response.json(), list) else response.json()
        fork_id = fork["sandboxID"]
        try:
            assert fork["trafficAccessToken"] and fork["trafficAccessToken"] != sbx.traffic_access_token
            refused = httpx.get(f"https://8000-{fork_id}.{DOMAIN}/", verify=trusting(tls_dir / "ca.pem"),
                                headers={"e2b-traffic-access-token": sbx.traffic_access_token})
            assert refused.status_code == 403
        finally:
            httpx.delete(f"{sdk_opts['api_url']}/sandboxes/{fork_id}", headers={"X-API-Key": sdk_opts["api_key"]})
    finally:
        sbx.kill()


def test_mask_request_host_rewrites_host_and_keeps_the_original(sdk_opts, tls_dir):
    sbx = Sandbox.create(network={"mask_request_host": "localhost:${PORT}"}, **sdk_opts)
    try:
        sbx.files.write("/home/user/echo.py", HEADER_ECHO)
        sbx.commands.run("python3 /home/user/echo.py", background=True)
        seen = get_until(f"https://{sbx.get_host(8000)}/x?y=1", verify=trusting(tls_dir / "ca.pem")).json()
        assert seen == {"host": "localhost:8000", "forwarded": f"8000-{sbx.sandbox_id}.{DOMAIN}", "path": "/x?y=1"}
        assert sbx.get_info().network == {"allow_public_traffic": True, "mask_request_host": "localhost:${PORT}"}
    finally:
        sbx.kill()


def test_https_ports_are_spoken_to_over_https_inside(sdk_opts, tls_dir):
    inner = installation_tls(TEST_ROOT / "t7-inner-tls", "inner.test")  # any certificate: it is not verified
    sbx = Sandbox.create(network={"https_ports": [8443]}, **sdk_opts)
    try:
        sbx.files.write("/home/user/cert.pem", inner.cert.read_text())
        sbx.files.write("/home/user/key.pem", inner.key.read_text())
        sbx.files.write("/home/user/tls-site/index.html", "spoken over TLS inside")
        sbx.files.write("/home/user/https_server.py", HTTPS_SERVER)
        sbx.commands.run("python3 /home/user/https_server.py", background=True)
        response = get_until(f"https://{sbx.get_host(8443)}/index.html", verify=trusting(tls_dir / "ca.pem"))
        assert response.status_code == 200 and response.text == "spoken over TLS inside"
    finally:
        sbx.kill()


@pytest.mark.parametrize(("network", "message"), [
    ({"mask_request_host": "bad host/with slash"}, "mask request host is not valid: bad host/with slash"),
    ({"https_ports": [49983]}, "https port 49983 is not allowed"),
    ({"dns_servers": ["1.1.1.1"]}, "network.dnsServers is not supported by this server"),
])
def test_bad_or_unsupported_network_options_are_refused_with_400(sdk_opts, network, message):
    before = {s.sandbox_id for s in Sandbox.list(**sdk_opts).next_items()}
    with pytest.raises(Exception, match=re.escape(message)) as raised:
        Sandbox.create(network=network, **sdk_opts)
    assert "400" in str(raised.value) or type(raised.value).__name__ == "InvalidArgumentException"
    assert {s.sandbox_id for s in Sandbox.list(**sdk_opts).next_items()} == before  # nothing left running


def test_update_network_switches_the_internet_and_refuses_what_is_not_enforced(sandbox):
    sandbox.update_network({"allow_internet_access": False})
    assert sandbox.get_info().allow_internet_access is False
    sandbox.update_network({})
    assert sandbox.get_info().allow_internet_access is True
    with pytest.raises(Exception, match=re.escape("network.dnsServers is not supported by this server")):
        sandbox.update_network({"allow_internet_access": False, "dns_servers": ["1.1.1.1"]})
    assert sandbox.get_info().allow_internet_access is True  # a refused update changes nothing


PID_SERVER = r'''
import os
from http.server import BaseHTTPRequestHandler, HTTPServer
class Pid(BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
HTTPServer(("0.0.0.0", 8000), Pid).serve_forever()
'''


def test_auto_paused_sandbox_resumes_on_a_request_to_its_public_url(sdk_opts, tls_dir):
    sbx = Sandbox.create(timeout=4, lifecycle={"on_timeout": "pause", "auto_resume": True}, **sdk_opts)
    try:
        sbx.files.write("/home/user/pid.py", PID_SERVER)
        sbx.commands.run("python3 /home/user/pid.py", background=True)
        url, ca = f"https://{sbx.get_host(8000)}/", trusting(tls_dir / "ca.pem")
        first = get_until(url, verify=ca)
        assert first.status_code == 200
        deadline = time.monotonic() + 60
        while Sandbox.get_info(sbx.sandbox_id, **sdk_opts).state.value != "paused":
            assert time.monotonic() < deadline, "the sandbox did not pause at its timeout"
            time.sleep(0.5)
        again = httpx.get(url, verify=ca, timeout=60)
        assert again.status_code == 200
        assert again.text == first.text  # the same server process, restored with its memory
        info = Sandbox.get_info(sbx.sandbox_id, **sdk_opts)
        assert info.state.value == "running"
        assert (info.end_at - dt.datetime.now(dt.UTC)).total_seconds() > 1  # a fresh timeout
    finally:
        sbx.kill()


# --- from inside sandboxes -------------------------------------------------------------------------------

def test_a_sandbox_opens_another_sandboxs_public_url_over_https(sdk_opts, sandbox):
    sandbox.files.write("/home/user/site/hello.txt", "from the other sandbox")
    sandbox.commands.run("cd /home/user/site && python3 -m http.server 8000", background=True)
    host = sandbox.get_host(8000)
    other = Sandbox.create(**sdk_opts)
    try:
        # The name resolves to the server's service address, not to the sandbox itself (*.localhost).
        resolved = other.commands.run(f"getent ahostsv4 {host}").stdout.split()[0]
        assert ipaddress.IPv4Address(resolved) in ipaddress.IPv4Network("169.254.54.0/24")
        # Python's ssl and curl verify against the system store, which now has the installation's CA.
        fetch = ("import time, urllib.request\nfor _ in range(75):\n    try:\n"
                 f"        print(urllib.request.urlopen('https://{host}/hello.txt').read().decode()); break\n"
                 "    except OSError:\n        time.sleep(0.2)\n")
        other.files.write("/tmp/fetch.py", fetch)
        assert other.commands.run("python3 /tmp/fetch.py").stdout.strip() == "from the other sandbox"
        # curl resolves *.localhost to loopback by itself (RFC 6761), so it is told where the name points.
        curl = other.commands.run(f"curl -sS --resolve {host}:443:{resolved} https://{host}/hello.txt")
        assert curl.stdout == "from the other sandbox"
        # Other names still resolve through the host's resolver (here the test's DNS server).
        assert other.commands.run("getent ahostsv4 example.org").stdout.split()[0] == DNS_ANSWER
    finally:
        other.kill()


def test_a_sandbox_without_internet_cannot_open_public_urls(sdk_opts, sandbox):
    offline = Sandbox.create(allow_internet_access=False, **sdk_opts)
    try:
        result = offline.commands.run(f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' "
                                      f"--resolve api.{DOMAIN}:443:{service_address()} https://api.{DOMAIN}/health",
                                      on_stdout=None)
        pytest.fail(f"an offline sandbox reached the server: {result.stdout}")
    except CommandExitException as refused:
        assert refused.exit_code != 0
    finally:
        offline.kill()


def service_address() -> ipaddress.IPv4Address:
    from corral.network.service import default_address

    return default_address(INSTANCE)
