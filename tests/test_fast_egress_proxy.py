"""The egress proxy's decisions (corral.network.egress_proxy): the name a connection asks for, read from a
real TLS ClientHello (made by Python's ssl) or an HTTP request head, and what the rules make of it. The
proxy's traffic itself is tested through the SDK (tests/test_egress_sdk.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl

import pytest

from corral.network.egress_proxy import EgressPolicy, EgressProxy, http_host, tls_server_name


def client_hello(server_name: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_sni_of_a_real_client_hello():
    assert tls_server_name(client_hello("api.example.com")) == "api.example.com"
    assert tls_server_name(client_hello(None)) is None
    assert tls_server_name(b"GET / HTTP/1.1\r\n\r\n") is None
    assert tls_server_name(client_hello("x.example.com")[:40]) is None  # cut short: no name, no crash


def test_the_host_of_an_http_request_head():
    assert http_host(b"GET /a HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\n") == "example.com"
    assert http_host(b"GET / HTTP/1.1\r\nhost: Example.org\r\n\r\n") == "Example.org"
    assert http_host(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nHost: late.example\r\n") is None  # body, not head
    assert http_host(b"\x16\x03\x01 not http") is None


@pytest.mark.parametrize(("rule", "name", "allowed"), [
    ("example.com", "example.com", True), ("example.com", "EXAMPLE.com.", True),
    ("example.com", "api.example.com", False), ("*.example.com", "api.example.com", True),
    ("*.example.com", "a.b.example.com", True), ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False), ("*", "anything.test", True),
])
def test_domain_rules(rule, name, allowed):
    assert EgressPolicy(True, (), ("0.0.0.0/0",), (rule,)).domain_allowed(name) is allowed


def decide(policy: EgressPolicy, name: str | None, destination: str, resolves_to: list[str]):
    proxy = EgressProxy(lambda _: policy, ["127.0.0.1"], listen="127.0.0.1", port=0,
                        never=[ipaddress.ip_network("10.201.0.0/16")])

    async def resolve(_: str) -> list[ipaddress.IPv4Address]:
        return [ipaddress.IPv4Address(a) for a in resolves_to]

    proxy._resolve = resolve
    return asyncio.run(proxy._decide(policy, name, ipaddress.IPv4Address(destination), "10.201.0.2"))


def test_an_allowed_name_goes_where_the_proxy_resolves_it_not_where_the_sandbox_dialled():
    policy = EgressPolicy(True, (), ("0.0.0.0/0",), ("api.example.com",))
    assert decide(policy, "api.example.com", "203.0.113.9", ["198.51.100.7"]) == ipaddress.IPv4Address("198.51.100.7")


def test_an_allowed_name_resolving_to_a_private_address_is_refused():
    policy = EgressPolicy(True, (), ("0.0.0.0/0",), ("api.example.com",))
    assert decide(policy, "api.example.com", "203.0.113.9", ["10.0.0.5", "127.0.0.1", "10.201.0.9"]) is None
    assert decide(policy, "api.example.com", "203.0.113.9", []) is None  # does not resolve


def test_other_names_fall_to_the_address_rules():
    deny_all = EgressPolicy(True, ("203.0.113.0/24",), ("0.0.0.0/0",), ("api.example.com",))
    assert decide(deny_all, "other.example.com", "198.51.100.7", ["198.51.100.7"]) is None
    assert decide(deny_all, "other.example.com", "203.0.113.9", []) == ipaddress.IPv4Address("203.0.113.9")
    assert decide(deny_all, None, "198.51.100.7", []) is None
    offline = EgressPolicy(False, (), (), ("api.example.com",))
    assert decide(offline, "other.example.com", "198.51.100.7", []) is None
    open_ = EgressPolicy(True, (), ("192.0.2.0/24",), ("api.example.com",))
    assert decide(open_, "other.example.com", "198.51.100.7", []) == ipaddress.IPv4Address("198.51.100.7")
    assert decide(open_, None, "10.1.2.3", []) is None  # private, whatever the rules


def test_method_and_path_scopes_of_a_rule():
    from corral.network.egress_proxy import _out_of_scope

    rule = {"methods": ["GET", "POST"], "pathPrefixes": ["/v1/models", "/v1/chat/completions"]}
    assert _out_of_scope(rule, "api.x", "GET", "/v1/models?limit=2") is None
    assert _out_of_scope(rule, "api.x", "post", "/v1/chat/completions") is None
    refusal = _out_of_scope(rule, "api.x", "DELETE", "/v1/models")
    assert refusal == "egress rule for api.x allows only GET, POST, not DELETE"
    assert "not /v1/files" in _out_of_scope(rule, "api.x", "GET", "/v1/files")
    assert "not /v2/models" in _out_of_scope(rule, "api.x", "GET", "http://api.x/v2/models")  # absolute form
    assert _out_of_scope({"headers": {"X": "y"}}, "api.x", "PATCH", "/anything") is None  # no scope: all


def test_absolute_request_targets_become_origin_form():
    from corral.network.egress_proxy import _origin_form

    assert _origin_form("http://evil.example/a/b?c=1") == "/a/b?c=1"
    assert _origin_form("https://evil.example") == "/"
    assert _origin_form("*") == "/"


@pytest.mark.parametrize(("head", "problem"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\nGET /admin HTTP/1.1", "line breaks must be CRLF"),
    (b"GET / HTTP/1.1\r\nX: a\rb", "line breaks must be CRLF"),
    (b"GET / HTTP/1.1\r\nX: a\x00b", "control characters"),
    (b"GET / HTTP/1.1\r\nX: a\r\n  folded", "folded header lines"),
    (b"GET /a b HTTP/1.1\r\nX: y", "a malformed request line"),
    (b"GET / HTTP/2\r\nX: y", "a malformed request line"),
    (b"GET / HTTP/1.1\r\nBad Name: y", "a malformed header line"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", "more than once"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", "more than once"),
])
def test_request_heads_a_server_could_read_differently_are_refused(head, problem):
    from corral.network.egress_proxy import malformed_head

    assert problem in malformed_head(head)
    assert malformed_head(b"POST /v1/x?y=1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nX-Tab: a\tb") is None


def test_names_from_a_sandbox_must_be_dns_names():
    from corral.network.egress_proxy import valid_name

    assert valid_name("API.Example.com.") == "api.example.com"
    for bad in ("/etc/x.example.com", "../../x.example.com", "a b.example.com", "x" * 300, "", None, "a_b.com"):
        assert valid_name(bad) is None


def test_leaf_certificates_never_put_the_name_in_a_path(tmp_path):
    from corral.proxy.tls import EgressCA

    ca = EgressCA(tmp_path / "tls")
    ca.context_for("api.example.com")
    assert not list((tmp_path / "tls" / "egress-leaves").glob("*.pem"))  # loaded, then removed
    assert not (tmp_path / "tls" / "egress-leaves" / "api.example.com.pem").exists()


def test_scopes_refuse_ambiguous_paths_trace_and_prefix_lookalikes():
    from corral.network.egress_proxy import _out_of_scope

    rule = {"pathPrefixes": ["/v1/models"]}
    for path in ("/v1/models/../admin", "/v1/models/%2e%2e/admin", "/v1/models%2Fadmin", "/v1/models\\x"):
        assert "dot segments" in _out_of_scope(rule, "a", "GET", path)
    assert "not /v1/models-admin" in _out_of_scope(rule, "a", "GET", "/v1/models-admin")
    assert _out_of_scope(rule, "a", "GET", "/v1/models") is None
    assert _out_of_scope(rule, "a", "GET", "/v1/models/gpt") is None
    assert "never forwarded" in _out_of_scope({}, "a", "TRACE", "/")
