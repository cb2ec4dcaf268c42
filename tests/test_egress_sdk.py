"""Egress rules by address through the unmodified SDK (`network={"allow_out", "deny_out"}`,
`allow_internet_access`, `update_network`): enforced by the instance's nftables table, with test hosts in
network namespaces this module makes (TEST-NET-1, -2 and -3 addresses stand in for the internet, a
10.99/16 host for a private LAN). No traffic leaves the machine."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from conftest import DNS_ANSWER, DNS_HOST_ADDRESS, TEST_ROOT
from e2b import ALL_TRAFFIC, CommandExitException, Sandbox

from tests.helpers.server import ServerProcess
from tests.helpers.testnet import TestHost

INSTANCE, NETWORK = "t10", "10.221.0.0/22"
# Each test host has a /24 of its own (its host-side veth holds .254 of it). ONE is the web host every name
# resolves to (the test DNS server's one answer); TWO a second host on the internet; LAN a private one.
ONE, TWO, LAN = DNS_ANSWER, "198.51.100.41", "10.99.41.1"


@pytest.fixture(scope="module")
def hosts():
    made = [TestHost(name, address).up() for name, address in (("egweb", ONE), ("eg2", TWO), ("eglan", LAN))]
    for host in made:
        host.serve_http(8080)
    # Every name the test DNS server is asked about resolves to ONE: it serves them all on 80 and 443, so
    # only the rules tell allowed.test from other.test.
    made[0].serve_http(80)
    made[0].serve_https(443, TEST_ROOT / "egweb-tls")
    yield
    for host in made:
        host.down()


@pytest.fixture(scope="module")
def opts(harness, runtime, store, hosts):
    # The proxy verifies the servers it sends rewritten requests to; the test host's CA is ours.
    server = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                           extra_env={"CORRAL_EGRESS_EXTRA_CA": str(TEST_ROOT / "egweb-tls" / "ca.pem")})
    with server.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        key = server.cli("keys", "create", "--name", "egress").strip()
        yield {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def reaches(sbx: Sandbox, address: str) -> bool:
    try:
        out = sbx.commands.run(f"curl -sS --max-time 3 http://{address}:8080/").stdout
    except CommandExitException:
        return False
    assert out.startswith("hello from"), out
    return True


@pytest.fixture()
def sandbox_with(opts):
    made: list[Sandbox] = []

    def make(**kwargs) -> Sandbox:
        made.append(Sandbox.create(**opts, **kwargs))
        return made[-1]

    yield make
    for sbx in made:
        sbx.kill()


def test_deny_all_with_one_allowed_address(sandbox_with):
    sbx = sandbox_with(network={"deny_out": [ALL_TRAFFIC], "allow_out": [ONE]})
    assert reaches(sbx, ONE)
    assert not reaches(sbx, TWO)
    assert sbx.get_info().network == {"allow_public_traffic": True, "allow_out": [f"{ONE}/32"],
                                      "deny_out": ["0.0.0.0/0"]}


def test_deny_one_address_leaves_the_others(sandbox_with):
    sbx = sandbox_with(network={"deny_out": [f"{TWO}/24"]})
    assert reaches(sbx, ONE)
    assert not reaches(sbx, TWO)


def test_allow_wins_over_deny(sandbox_with):
    sbx = sandbox_with(network={"deny_out": [TWO], "allow_out": [TWO]})
    assert reaches(sbx, TWO)


def test_internet_off_still_reaches_allowed_addresses(sandbox_with):
    sbx = sandbox_with(allow_internet_access=False, network={"allow_out": [ONE]})
    assert reaches(sbx, ONE)
    assert not reaches(sbx, TWO)


def test_private_ranges_stay_closed_whatever_the_rules_say(sandbox_with):
    sbx = sandbox_with(network={"allow_out": [LAN, "10.0.0.0/8"]})
    assert not reaches(sbx, LAN)
    assert reaches(sbx, ONE)


def test_update_network_tightens_and_clears_rules_on_a_running_sandbox(sandbox_with):
    sbx = sandbox_with()
    assert reaches(sbx, ONE) and reaches(sbx, TWO)
    sbx.update_network({"deny_out": [ALL_TRAFFIC], "allow_out": [ONE]})
    assert reaches(sbx, ONE)
    assert not reaches(sbx, TWO)
    assert sbx.get_info().network["deny_out"] == ["0.0.0.0/0"]
    sbx.update_network({})  # a full replacement: nothing left
    assert reaches(sbx, TWO)
    assert "deny_out" not in sbx.get_info().network


def test_rules_survive_pause_and_resume_and_go_to_forks(sandbox_with, opts):
    sbx = sandbox_with(network={"deny_out": [TWO]})
    sbx.pause()
    sbx = Sandbox.connect(sbx.sandbox_id, **opts)
    assert not reaches(sbx, TWO) and reaches(sbx, ONE)
    import httpx

    response = httpx.post(f"{opts['api_url']}/sandboxes/{sbx.sandbox_id}/fork", json={"count": 1},
                          headers={"X-API-Key": opts["api_key"]})
    assert response.status_code == 201, response.text
    fork = Sandbox.connect(response.json()[0]["sandbox"]["sandboxID"], **opts)
    try:
        assert not reaches(fork, TWO) and reaches(fork, ONE)
    finally:
        fork.kill()


def test_a_killed_sandboxs_rules_do_not_stay_behind(sandbox_with):
    sbx = sandbox_with(network={"deny_out": [ALL_TRAFFIC], "allow_out": [ONE, "allowed.test"]})
    assert reaches(sbx, ONE)
    sbx.kill()
    for name in ("egress_allow", "egress_deny", "proxied"):
        listed = subprocess.run(["nft", "list", "set", "inet", f"corral_{INSTANCE}", name], capture_output=True,
                                text=True, check=True).stdout
        assert "elements" not in listed, listed


@pytest.mark.parametrize(("network", "message"), [
    ({"allow_out": ["api.example.com"]}, "you must include 'ALL_TRAFFIC' in deny out"),
    ({"allow_out": ["not an address"]}, "invalid allowed address not an address"),
    ({"deny_out": ["example.com"]}, "invalid denied CIDR example.com"),
    ({"deny_out": ["0.0.0.0/8"]}, "invalid denied CIDR 0.0.0.0/8"),
])
def test_bad_rules_are_refused_and_leave_nothing_running(opts, network, message):
    before = {s.sandbox_id for s in Sandbox.list(**opts).next_items()}
    with pytest.raises(Exception, match=re.escape(message)):
        Sandbox.create(network=network, **opts)
    assert {s.sandbox_id for s in Sandbox.list(**opts).next_items()} == before


def test_a_refused_update_changes_nothing(sandbox_with):
    sbx = sandbox_with(network={"deny_out": [TWO]})
    with pytest.raises(Exception, match="invalid denied CIDR nope"):
        sbx.update_network({"deny_out": ["nope"]})
    assert not reaches(sbx, TWO)
    assert sbx.get_info().network["deny_out"] == [f"{TWO}/32"]


# --- rules by domain (the host's egress proxy) ---------------------------------------------------------

def fetch(sbx: Sandbox, url: str) -> str | None:
    """What curl in the sandbox gets from `url` (None: refused). TLS is not verified: the test host's
    certificate is its own; what is tested is where the connection may go."""
    try:
        return sbx.commands.run(f"curl -sSk --max-time 5 {url}").stdout.strip()
    except CommandExitException:
        return None


def test_an_allowed_domain_is_reached_and_another_name_on_the_same_address_is_not(sandbox_with):
    sbx = sandbox_with(network={"allow_out": ["allowed.test"], "deny_out": [ALL_TRAFFIC]})
    assert fetch(sbx, "http://allowed.test/") == "hello from egweb"  # by Host
    assert fetch(sbx, "https://allowed.test/") == "hello from egweb over TLS"  # by SNI
    assert fetch(sbx, "http://other.test/") is None
    assert fetch(sbx, "https://other.test/") is None
    assert fetch(sbx, f"http://{ONE}/") is None  # the address itself, by no name
    assert not reaches(sbx, ONE)  # other ports: the address rules (deny all)
    assert sbx.get_info().network["allow_out"] == ["allowed.test"]


def test_a_wildcard_matches_below_the_name_but_not_the_name(sandbox_with):
    sbx = sandbox_with(network={"allow_out": ["*.allowed.test", TWO], "deny_out": [ALL_TRAFFIC]})
    assert fetch(sbx, "http://api.allowed.test/") == "hello from egweb"
    assert fetch(sbx, "https://a.b.allowed.test/") == "hello from egweb over TLS"
    assert fetch(sbx, "http://allowed.test/") is None
    assert reaches(sbx, TWO)  # an allowed address next to the domains


def test_domain_rules_with_the_internet_off(sandbox_with):
    sbx = sandbox_with(allow_internet_access=False, network={"allow_out": ["allowed.test"],
                                                              "deny_out": [ALL_TRAFFIC]})
    assert fetch(sbx, "https://allowed.test/") == "hello from egweb over TLS"  # names still resolve
    assert fetch(sbx, "https://other.test/") is None


def test_update_network_adds_and_clears_domain_rules(sandbox_with):
    sbx = sandbox_with()
    assert fetch(sbx, "http://other.test/") == "hello from egweb"
    sbx.update_network({"allow_out": ["allowed.test"], "deny_out": [ALL_TRAFFIC]})
    assert fetch(sbx, "http://other.test/") is None
    assert fetch(sbx, "http://allowed.test/") == "hello from egweb"
    sbx.update_network({})
    assert fetch(sbx, "http://other.test/") == "hello from egweb"


def test_an_upstream_egress_proxy_gets_e2bs_answer_for_a_team_without_it(opts):
    with pytest.raises(Exception, match=re.escape("Egress proxy (network.egressProxy) is not enabled for this team.")):
        Sandbox.create(network={"egress_proxy": {"address": "proxy.example.com:1080"}}, **opts)


def test_iam_identity_tokens_are_refused_with_a_clear_message(opts):
    from e2b import Secret

    token = Secret.iam_token(audience="sts.amazonaws.com", token_type="JWT-SVID")
    with pytest.raises(Exception, match="iam identity tokens are not supported by this server"):
        Sandbox.create(iam={"tokens": {"aws": token}}, **opts)


def test_an_allowed_name_sent_to_a_denied_address_goes_to_the_names_own_address(sandbox_with):
    sbx = sandbox_with(network={"allow_out": ["allowed.test"], "deny_out": [ALL_TRAFFIC]})
    # The sandbox dials TWO (denied) but says allowed.test: the proxy dials allowed.test where it resolves.
    assert fetch(sbx, f"--resolve allowed.test:80:{TWO} http://allowed.test/") == "hello from egweb"
    assert fetch(sbx, f"--resolve allowed.test:80:{TWO} http://allowed.test:8080/") is None  # other ports: by address



# --- header rules and secrets (the egress proxy terminates TLS for ruled domains) ----------------------

SECRET_VALUE = "sk-test-5f2b9c0d41e7-only-on-the-wire"
# Counts the processes (other than itself) whose readable memory holds the value in /dev/shm/look.
MEMORY_SEARCH = r'''
import os, re
needle = open("/dev/shm/look", "rb").read()
hits = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", 0)
    except OSError:
        continue
    for line in maps:
        span, perms = line.split()[:2]
        if not perms.startswith("r"):
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        try:
            mem.seek(start)
            if needle in mem.read(min(end - start, 256 << 20)):
                hits += 1
                break
        except (OSError, OverflowError, ValueError):
            continue
print(hits)
'''


def sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def secret(opts):
    from e2b import Secret

    Secret.create("egress-key", SECRET_VALUE, **opts)
    yield "egress-key"
    Secret.destroy("egress-key", **opts)


def ruled(name: str, header_value: str) -> dict:
    return {"allow_out": [name], "deny_out": [ALL_TRAFFIC],
            "rules": {name: [{"transform": {"headers": {"Authorization": header_value}}}]}}


def test_a_header_rule_sends_the_secret_which_never_enters_the_sandbox(sandbox_with, secret):
    import json

    sbx = sandbox_with(network=ruled("api.egress.test", "Bearer ${e2b.secrets.egress-key}"))
    # No -k: the sandbox trusts the egress CA the proxy signs with (envd's caBundle).
    for url in ("https://api.egress.test/", "http://api.egress.test/"):
        seen = json.loads(sbx.commands.run(f"curl -sS --max-time 10 -H 'Authorization: mine' {url}").stdout)
        assert seen == {"authorization_sha256": sha(f"Bearer {SECRET_VALUE}"), "has_placeholder": False,
                        "host": "api.egress.test"}
    # The value is nowhere the sandbox can look: not in its environment, files or process list.
    # (The value to look for is written in two halves to a file outside the searched places, so that no
    # command line of the search itself holds it.)
    sbx.files.write("/tmp/memsearch.py", MEMORY_SEARCH)
    half = len(SECRET_VALUE) // 2
    sbx.commands.run(f"printf %s '{SECRET_VALUE[:half]}' > /dev/shm/look; printf %s '{SECRET_VALUE[half:]}' >> "
                     "/dev/shm/look")
    leaked = sbx.commands.run("(env; ps auxww; grep -rIh -f /dev/shm/look /home /tmp /etc /root /var 2>/dev/null) "
                              "| grep -c -f /dev/shm/look || true", user="root").stdout.strip()
    assert leaked == "0"
    assert sbx.commands.run("python3 /tmp/memsearch.py", user="root").stdout.strip() == "0"
    # The search does find the value where it is (so the 0 above means something).
    sbx.commands.run("cp /dev/shm/look /home/user/planted")
    found = sbx.commands.run("grep -rIh -f /dev/shm/look /home 2>/dev/null | grep -c -f /dev/shm/look || true",
                             user="root").stdout.strip()
    assert found == "1"
    sbx.commands.run("python3 -c \"import time; held = open('/dev/shm/look').read(); time.sleep(120)\"",
                     background=True)
    deadline = time.monotonic() + 10
    while (held := sbx.commands.run("python3 /tmp/memsearch.py", user="root").stdout.strip()) == "0" \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held == "1"


def test_a_rule_naming_a_missing_secret_fails_the_request_clearly(sandbox_with):
    sbx = sandbox_with(network=ruled("api.egress.test", "Bearer ${e2b.secrets.nope}"))
    answer = sbx.commands.run("curl -sS --max-time 10 -w ' %{http_code}' https://api.egress.test/").stdout
    assert answer.endswith(" 502") and "secret 'nope' not found" in answer
    assert "${e2b" not in answer


def test_header_rules_grant_no_egress(sandbox_with, secret):
    sbx = sandbox_with(network={"deny_out": [ALL_TRAFFIC], "rules": {
        "api.egress.test": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.egress-key}"}}}]}})
    assert fetch(sbx, "https://api.egress.test/") is None


def test_a_rules_methods_and_path_prefixes_limit_what_the_sandbox_may_send(opts, secret):
    """Corral's extension, through the REST API (the SDKs pass on only a rule's transform.headers)."""
    import json

    import httpx

    rule = {"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.egress-key}"}},
            "methods": ["GET"], "pathPrefixes": ["/v1/models"]}
    created = httpx.post(f"{opts['api_url']}/v2/sandboxes", headers={"X-API-Key": opts["api_key"]}, json={
        "templateID": "base", "network": {"allowOut": ["api.egress.test"], "denyOut": [ALL_TRAFFIC],
                                          "rules": {"api.egress.test": [rule]}}})
    assert created.status_code == 201, created.text
    sbx = Sandbox.connect(created.json()["sandboxID"], **opts)
    try:
        seen = json.loads(sbx.commands.run("curl -sS --max-time 10 https://api.egress.test/v1/models/x").stdout)
        assert seen["authorization_sha256"] == sha(f"Bearer {SECRET_VALUE}")
        refused = sbx.commands.run("curl -sS -X DELETE -w ' %{http_code}' https://api.egress.test/v1/models").stdout
        assert refused.endswith(" 403") and "allows only GET, not DELETE" in refused
        refused = sbx.commands.run("curl -sS -w ' %{http_code}' https://api.egress.test/v1/files").stdout
        assert refused.endswith(" 403") and "allows only paths under /v1/models, not /v1/files" in refused
        assert sbx.get_info().network["rules"]["api.egress.test"][0]["transform"]["headers"] == rule["transform"][
            "headers"]
    finally:
        sbx.kill()


def test_header_rules_added_by_update_network_work_over_verified_https(sandbox_with, secret):
    import json

    sbx = sandbox_with()
    sbx.update_network(ruled("api.egress.test", "Bearer ${e2b.secrets.egress-key}"))
    # The sandbox was made without rules: the egress CA reached its trust store with the update.
    seen = json.loads(sbx.commands.run("curl -sS --max-time 10 https://api.egress.test/").stdout)
    assert seen["authorization_sha256"] == sha(f"Bearer {SECRET_VALUE}")


def test_a_ruled_request_cannot_name_another_host(sandbox_with, secret):
    """Else a server or CDN hosting both sites would route the secret to the site the sandbox names."""
    import json

    sbx = sandbox_with(network=ruled("api.egress.test", "Bearer ${e2b.secrets.egress-key}"))
    seen = json.loads(sbx.commands.run("curl -sS --max-time 10 -H 'Host: evil.egress.test' "
                                       "https://api.egress.test/").stdout)
    assert seen["host"] == "api.egress.test"
    # On port 80 the Host is the name the rules judge: another name is another (here: denied) domain.
    assert fetch(sbx, "-H 'Host: evil.egress.test' http://api.egress.test/") is None
