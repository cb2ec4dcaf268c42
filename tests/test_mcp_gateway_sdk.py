"""The `mcp-gateway` template behind the unmodified E2B SDK's `Sandbox.create(mcp={...})`; `get_mcp_url()` is
a public URL over TLS as a user has it (the installation's CA; one module at a time uses 443): the
gateway starts the servers the config names, an `mcp` SDK client at `get_mcp_url()` with `get_mcp_token()`
lists and calls their tools (prefixed by server), a wrong token is refused, `connect()` reads back the same
token, a `github/...` entry's install_cmd and run_cmd run, and a config the gateway cannot satisfy fails the
create and leaves no sandbox."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox, SandboxException
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t25", "10.252.0.0/22"
DOMAIN = "corral-t25.localhost"

# A small MCP server on the SDK the template has, as a `github/...` entry's install_cmd would fetch one.
ECHO_SERVER = '''
from mcp.server.mcpserver import MCPServer
server = MCPServer("echo")

@server.tool(description="The text, in capitals.")
def shout(text: str) -> str:
    return text.upper()

server.run("stdio")
'''


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    harness.run(store.build("mcp-gateway", runtime), timeout=3600)
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=0,
                         domain=DOMAIN, https_port=443)
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def ca(server) -> Path:
    return Path(server.env["CORRAL_DATA_DIR"]) / "tls" / "ca-bundle.pem"


@pytest.fixture()
def opts(server) -> dict:
    """The SDK's own calls over plain HTTP: its TLS connection pool is made once per process, by whichever
    test module came first, so `SSL_CERT_FILE` set here would not reach it (tests/test_public_urls_sdk.py
    runs the SDK over TLS in subprocesses). The create answer still names the domain, so `get_mcp_url()`
    is the public HTTPS URL, which the tests open with their own client trusting the CA."""
    return {"api_url": server.url, "sandbox_url": server.url,
            "api_key": server.cli("keys", "create", "--name", "gateway").strip()}


def mcp_client(url: str, token: str, ca: Path) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, verify=ssl.create_default_context(
        cafile=str(ca)), timeout=60)
    return Client(streamable_http_client(url, http_client=http))


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def test_the_sdk_starts_a_gateway_whose_url_and_token_serve_the_configured_servers(opts, ca):
    sbx = Sandbox.create(mcp={"filesystem": {"paths": ["/home/user"]}, "time": {}}, timeout=120, **opts)
    try:
        assert sbx.get_mcp_url() == f"https://50005-{sbx.sandbox_id}.{DOMAIN}/mcp"
        sbx.files.write("/home/user/hello.txt", "hello through the gateway")
        token = sbx.get_mcp_token()

        async def session() -> tuple[set[str], str, str]:
            async with mcp_client(sbx.get_mcp_url(), token, ca) as client:
                names = {t.name for t in (await client.list_tools()).tools}
                read = await client.call_tool("filesystem__read_text_file", {"path": "/home/user/hello.txt"})
                now = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
                assert not read.is_error and not now.is_error, (text_of(read), text_of(now))
                return names, text_of(read), text_of(now)

        names, read, now = anyio.run(session)
        assert {"filesystem__read_text_file", "filesystem__list_directory", "time__get_current_time"} <= names
        assert all(n.startswith(("filesystem__", "time__")) for n in names)
        assert read == "hello through the gateway" and json.loads(now)["timezone"] == "UTC"

        refused = httpx.post(sbx.get_mcp_url(), json={}, headers={"Authorization": "Bearer wrong"},
                             verify=ssl.create_default_context(cafile=str(ca)))
        assert refused.status_code == 401
        # Another client connecting later reads the same token from the sandbox.
        assert Sandbox.connect(sbx.sandbox_id, **opts).get_mcp_token() == token
        pulled = sbx.commands.run("mcp-gateway pull time filesystem", user="root")
        assert pulled.stdout.splitlines() == ["time: installed", "filesystem: installed"]
    finally:
        sbx.kill()


def test_a_github_entry_runs_its_install_cmd_then_its_run_cmd(opts, ca):
    entry = {"install_cmd": f"cat > echo_server.py <<'EOF'\n{ECHO_SERVER}\nEOF",
             "run_cmd": "python3 echo_server.py", "envs": {"ECHO_MODE": "loud"}}
    # Without internet the gateway cannot clone from GitHub; install_cmd works in an empty directory.
    sbx = Sandbox.create(mcp={"github/acme/echo": entry}, allow_internet_access=False, timeout=120, **opts)
    try:
        async def session() -> str:
            async with mcp_client(sbx.get_mcp_url(), sbx.get_mcp_token(), ca) as client:
                assert [t.name for t in (await client.list_tools()).tools] == ["acme_echo__shout"]
                return text_of(await client.call_tool("acme_echo__shout", {"text": "quiet"}))

        assert anyio.run(session) == "QUIET"
    finally:
        sbx.kill()


@pytest.mark.parametrize(("config", "reason"), [
    ({"exa": {"apiKey": "not-used"}}, "exa: not a server this gateway can run"),
    ({"filesystem": {}}, "filesystem: needs `paths`"),
    ({"github/acme/broken": {"install_cmd": "echo no such package >&2; exit 7", "run_cmd": "true"}},
     "install_cmd failed (exit 7): no such package"),
    ({"github/acme/silent": {"run_cmd": "echo not an MCP server; exit 3"}}, "server github/acme/silent did not start"),
])
def test_a_config_the_gateway_cannot_satisfy_fails_the_create_and_leaves_no_sandbox(opts, config, reason):
    before = {s.sandbox_id for s in Sandbox.list(**opts).next_items()}
    with pytest.raises(SandboxException, match="Failed to start MCP gateway") as failed:
        Sandbox.create(mcp=config, allow_internet_access=False, timeout=120, **opts)
    assert reason in str(failed.value)
    assert {s.sandbox_id for s in Sandbox.list(**opts).next_items()} == before


def call_over_gateway(sbx: Sandbox, ca: Path, tool: str, arguments: dict) -> str:
    async def session() -> str:
        async with mcp_client(sbx.get_mcp_url(), sbx.get_mcp_token(), ca) as client:
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, text_of(result)
            return text_of(result)

    return anyio.run(session)


def test_the_gateway_and_its_servers_come_back_with_a_paused_sandbox(opts, ca):
    sbx = Sandbox.create(mcp={"memory": {}}, allow_internet_access=False, timeout=120, **opts)
    try:
        call_over_gateway(sbx, ca, "memory__create_entities", {"entities": [
            {"name": "corral", "entityType": "project", "observations": ["forks sandboxes"]}]})
        sbx.beta_pause()
        resumed = Sandbox.connect(sbx.sandbox_id, **opts)
        # The memory server kept its graph in memory: the same process answers after the resume.
        graph = json.loads(call_over_gateway(resumed, ca, "memory__read_graph", {}))
        assert [e["name"] for e in graph["entities"]] == ["corral"]
    finally:
        sbx.kill()


def test_a_template_built_from_mcp_gateway_pulls_its_servers(opts, ca):
    from e2b import Template

    lines: list = []
    template = Template().from_template("mcp-gateway").add_mcp_server(["time", "fetch"])
    Template.build(template, "gateway-with-time", on_build_logs=lines.append, skip_cache=True, **opts)
    assert any("time: installed" in entry.message for entry in lines), [e.message for e in lines]
    sbx = Sandbox.create("gateway-with-time", mcp={"time": {}}, allow_internet_access=False, timeout=120, **opts)
    try:
        assert json.loads(call_over_gateway(sbx, ca, "time__get_current_time", {"timezone": "UTC"}))["timezone"] \
            == "UTC"
    finally:
        sbx.kill()
    failed: list = []
    with pytest.raises(Exception, match="mcp-gateway pull exa"):
        Template.build(Template().from_template("mcp-gateway").add_mcp_server("exa"), "gateway-with-exa",
                       on_build_logs=failed.append, **opts)
    assert any("exa: not in the catalogue" in entry.message for entry in failed), [e.message for e in failed]
