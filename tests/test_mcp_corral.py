"""`corral mcp` over stdio and `/mcp` on `corral serve` over Streamable HTTP, driven by the official `mcp` SDK's
client as an agent's MCP client would: its tools listed with their schemas; a sandbox created, code run with
printed output and a chart (an image comes back), a file written and read, a command's exit code, a failing
cell as a tool error the model can read, a preview URL fetched through Corral's proxy, a fork giving two
sandboxes, kill; a wrong key refused as a tool error; over HTTP a missing or wrong bearer key refused and a
read-only key unable to create; resources for files and logs; the desktop tools on a desktop sandbox; and a
scripted agent loop (a fixed sequence of tool calls as a model would make them) analysing a CSV."""

from __future__ import annotations

import base64
import json
import sys

import anyio
import httpx
import httpx2
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ImageContent, TextContent

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t24", "10.249.0.0/22"
TEMPLATE = "code-interpreter-v1"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    harness.run(store.build(TEMPLATE, runtime), timeout=3600)
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_POOL_TEMPLATES": f"base,{TEMPLATE}"})
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


def corral_mcp(server, key: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-c", "from corral.cli.main import app; app()", "mcp"],
                                 env={"E2B_API_URL": server.url, "E2B_API_KEY": key, "E2B_DOMAIN": server.domain,
                                      "PATH": "/usr/bin:/bin"})


def over_http(server, key: str | None):
    """A transport to the server's `/mcp` with `key` as bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return streamable_http_client(f"{server.url}/mcp", http_client=httpx2.AsyncClient(headers=headers, timeout=300))


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def data_of(result) -> dict | list:
    if result.structured_content is not None:
        value = result.structured_content
        return value.get("result", value) if isinstance(value, dict) and set(value) == {"result"} else value
    return json.loads(text_of(result))


def test_an_agent_drives_sandboxes_through_corral_mcp(server):
    key = server.cli("keys", "create", "--name", "mcp").strip()

    async def session() -> None:
        async with Client(corral_mcp(server, key)) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert {"create_sandbox", "run_command", "run_code", "write_file", "read_file", "list_files",
                    "get_preview_url", "pause_sandbox", "resume_sandbox", "snapshot_sandbox", "fork_sandbox",
                    "kill_sandbox", "list_sandboxes"} <= set(tools)
            assert tools["run_code"].input_schema["required"] == ["sandbox_id", "code"]
            assert tools["create_sandbox"].description

            created = await client.call_tool("create_sandbox", {"template": TEMPLATE, "timeout_seconds": 300})
            assert not created.is_error, text_of(created)
            sandbox_id = data_of(created)["sandbox_id"]

            ran = await client.call_tool("run_code", {"sandbox_id": sandbox_id, "code": (
                "import matplotlib.pyplot as plt\nprint('hello from the kernel')\n"
                "plt.plot([1, 2, 3], [1, 4, 9])\nplt.show()\n6 * 7")})
            assert not ran.is_error, text_of(ran)
            assert "hello from the kernel" in text_of(ran) and "42" in text_of(ran)
            images = [c for c in ran.content if isinstance(c, ImageContent)]
            assert images and base64.b64decode(images[0].data).startswith(PNG)

            failed = await client.call_tool("run_code", {"sandbox_id": sandbox_id, "code": "1 / 0"})
            assert failed.is_error and "ZeroDivisionError" in text_of(failed)

            wrote = await client.call_tool("write_file", {"sandbox_id": sandbox_id, "path": "/home/user/notes.txt",
                                                          "content": "written by an agent\n"})
            assert not wrote.is_error, text_of(wrote)
            read = await client.call_tool("read_file", {"sandbox_id": sandbox_id, "path": "/home/user/notes.txt"})
            assert text_of(read) == "written by an agent\n"
            listed = data_of(await client.call_tool("list_files", {"sandbox_id": sandbox_id}))
            assert "notes.txt" in [e["name"] for e in listed]

            command = data_of(await client.call_tool("run_command", {"sandbox_id": sandbox_id,
                                                                     "command": "echo out; echo err >&2; exit 3"}))
            assert command == {"stdout": "out\n", "stderr": "err\n", "exit_code": 3}

            await client.call_tool("run_command", {"sandbox_id": sandbox_id, "background": True,
                                                   "command": "cd /home/user && python3 -m http.server 8123"})
            preview = data_of(await client.call_tool("get_preview_url", {"sandbox_id": sandbox_id, "port": 8123}))
            assert preview["host"] == f"8123-{sandbox_id}.{server.domain}"
            page = None
            async with httpx.AsyncClient(timeout=10) as http:
                for _ in range(50):  # the server in the sandbox takes a moment to listen
                    page = await http.get(f"{server.url}/notes.txt", headers={"Host": preview["host"]})
                    if page.status_code == 200:
                        break
                    await anyio.sleep(0.2)
            assert page.text == "written by an agent\n"

            forked = data_of(await client.call_tool("fork_sandbox", {"sandbox_id": sandbox_id, "count": 2}))
            assert len(forked["sandbox_ids"]) == 2 and not forked["errors"]
            running = {s["sandbox_id"] for s in data_of(await client.call_tool("list_sandboxes", {}))}
            assert {sandbox_id, *forked["sandbox_ids"]} <= running
            for sid in [sandbox_id, *forked["sandbox_ids"]]:
                killed = await client.call_tool("kill_sandbox", {"sandbox_id": sid})
                assert not killed.is_error, text_of(killed)
            gone = await client.call_tool("read_file", {"sandbox_id": sandbox_id, "path": "/home/user/notes.txt"})
            assert gone.is_error and sandbox_id in text_of(gone)

    anyio.run(session)


def test_a_wrong_key_is_a_tool_error_not_a_crash(server):
    async def session() -> None:
        async with Client(corral_mcp(server, "e2b_" + "0" * 40)) as client:
            refused = await client.call_tool("create_sandbox", {})
            assert refused.is_error and "401" in text_of(refused)
            again = await client.call_tool("list_sandboxes", {})  # the server still answers
            assert again.is_error and "Invalid API key" in text_of(again)

    anyio.run(session)


def test_over_http_the_tools_act_with_the_bearer_key_and_serve_files_and_logs_as_resources(server):
    key = server.cli("keys", "create", "--name", "mcp-http").strip()

    async def session() -> str:
        async with Client(over_http(server, key)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"create_sandbox", "run_code", "desktop_screenshot", "desktop_click", "desktop_type",
                    "desktop_press", "desktop_scroll"} <= tools
            templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
            assert {"corral://sandboxes/{sandbox_id}/files{+path}", "corral://sandboxes/{sandbox_id}/logs"} \
                <= templates

            sandbox_id = data_of(await client.call_tool("create_sandbox", {"timeout_seconds": 120}))["sandbox_id"]
            try:
                command = data_of(await client.call_tool("run_command", {
                    "sandbox_id": sandbox_id, "command": "echo over http > /home/user/h.txt && whoami"}))
                assert command == {"stdout": "user\n", "stderr": "", "exit_code": 0}
                listed = await client.read_resource(f"corral://sandboxes/{sandbox_id}/files/home/user/h.txt")
                assert listed.contents[0].text == "over http\n"
                logs = (await client.read_resource(f"corral://sandboxes/{sandbox_id}/logs")).contents[0].text
                async with httpx.AsyncClient() as http:  # the same lines as the REST API gives the same key
                    rest = (await http.get(f"{server.url}/v2/sandboxes/{sandbox_id}/logs",
                                           headers={"X-API-KEY": key})).json()["logs"]
                assert logs.splitlines() == [f"{e['timestamp']} {e['level']:5} {e['message']}" for e in rest] \
                    or (not rest and logs == "(no log lines)")
                no_desktop = await client.call_tool("desktop_screenshot", {"sandbox_id": sandbox_id})
                assert no_desktop.is_error and "has no desktop" in text_of(no_desktop)
            finally:
                await client.call_tool("kill_sandbox", {"sandbox_id": sandbox_id})
        return sandbox_id

    sandbox_id = anyio.run(session)
    # Made with the bearer key: the REST API, asked with the same key, knows it (and that it is gone).
    events = httpx.get(f"{server.url}/events/sandboxes/{sandbox_id}", headers={"X-API-KEY": key})
    assert events.status_code == 200 and {"sandbox.lifecycle.created", "sandbox.lifecycle.killed"} <= {
        e["type"] for e in events.json()}


def test_over_http_a_missing_or_wrong_bearer_key_is_refused(server):
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream"}
    missing = httpx.post(f"{server.url}/mcp", json=initialize, headers=headers)
    assert missing.status_code == 401 and "Missing API key" in missing.json()["message"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.post(f"{server.url}/mcp", json=initialize,
                       headers={**headers, "Authorization": "Bearer e2b_" + "0" * 40})
    assert wrong.status_code == 401 and wrong.json()["message"] == "Invalid API key"
    key = server.cli("keys", "create", "--name", "mcp-raw").strip()
    accepted = httpx.post(f"{server.url}/mcp", json=initialize, headers={**headers, "Authorization": f"Bearer {key}"})
    assert accepted.status_code == 200, accepted.text

    async def session() -> None:
        async with Client(over_http(server, "e2b_" + "1" * 40)) as client:
            await client.list_tools()

    with pytest.raises(BaseException) as refused:  # the SDK's client gives up at its first request
        anyio.run(session)
    assert "Server returned an error response" in " ".join(str(e) for e in leaves(refused.value))


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in leaves(e)]
    return [error]


def test_over_http_a_read_only_key_lists_but_cannot_create(server):
    key = server.cli("keys", "create", "--name", "mcp-read", "--scope", "read").strip()

    async def session() -> None:
        async with Client(over_http(server, key)) as client:
            listed = await client.call_tool("list_sandboxes", {})
            assert not listed.is_error, text_of(listed)
            refused = await client.call_tool("create_sandbox", {})
            assert refused.is_error and "403" in text_of(refused) and "'sandboxes' scope" in text_of(refused)

    anyio.run(session)


def test_a_scripted_agent_analyses_a_csv_with_pandas_and_returns_a_chart(server):
    """What a model would do for "which region sold most? show me a chart": create, upload, analyse, plot,
    answer, clean up, each step one tool call whose result the next one uses."""
    key = server.cli("keys", "create", "--name", "mcp-agent").strip()
    csv = "region,month,sales\nnorth,1,120\nsouth,1,80\nnorth,2,150\nsouth,2,95\neast,1,60\neast,2,70\n"
    plan = [
        ("create_sandbox", lambda seen: {"template": TEMPLATE, "timeout_seconds": 300}),
        ("write_file", lambda seen: {"sandbox_id": seen["sandbox_id"], "path": "/home/user/sales.csv",
                                     "content": csv}),
        ("run_code", lambda seen: {"sandbox_id": seen["sandbox_id"], "code": (
            "import pandas as pd\ndf = pd.read_csv('/home/user/sales.csv')\n"
            "totals = df.groupby('region')['sales'].sum().sort_values(ascending=False)\n"
            "print(totals.to_string())\ntotals.idxmax()")}),
        ("run_code", lambda seen: {"sandbox_id": seen["sandbox_id"], "code": (
            "import matplotlib.pyplot as plt\ntotals.plot(kind='bar', title='Sales by region')\nplt.show()")}),
        ("kill_sandbox", lambda seen: {"sandbox_id": seen["sandbox_id"]}),
    ]

    async def agent() -> list:
        seen: dict = {}
        results = []
        async with Client(corral_mcp(server, key)) as client:
            for tool, arguments in plan:
                result = await client.call_tool(tool, arguments(seen))
                assert not result.is_error, f"{tool}: {text_of(result)}"
                if tool == "create_sandbox":
                    seen["sandbox_id"] = data_of(result)["sandbox_id"]
                results.append(result)
        return results

    _, _, analysed, charted, _ = anyio.run(agent)
    assert "north    270" in text_of(analysed) and text_of(analysed).endswith("result:\nnorth")
    chart = [c for c in charted.content if isinstance(c, ImageContent)]
    assert len(chart) == 1 and base64.b64decode(chart[0].data).startswith(PNG)
    # The chart's data too, for a model to read the bars rather than look at them.
    data = json.loads(text_of(charted).split("chart data:\n", 1)[1])
    assert data["type"] == "bar" and data["title"] == "Sales by region"
    assert {(bar["label"], bar["value"]) for bar in data["elements"]} == {("north", 270), ("south", 175),
                                                                          ("east", 130)}


def test_the_desktop_tools_see_and_drive_a_desktop_sandbox(server, harness, runtime, store):
    harness.run(store.build("desktop", runtime), timeout=3600)
    key = server.cli("keys", "create", "--name", "mcp-desktop").strip()

    async def session() -> None:
        async with Client(over_http(server, key)) as client:
            sandbox_id = data_of(await client.call_tool("create_sandbox", {"template": "desktop"}))["sandbox_id"]
            try:
                async def run(command: str) -> str:
                    return data_of(await client.call_tool("run_command", {
                        "sandbox_id": sandbox_id, "command": f"DISPLAY=:0 {command}"}))["stdout"]

                shot = await client.call_tool("desktop_screenshot", {"sandbox_id": sandbox_id})
                assert not shot.is_error, text_of(shot)
                png = base64.b64decode(next(c for c in shot.content if isinstance(c, ImageContent)).data)
                assert png.startswith(PNG)

                clicked = await client.call_tool("desktop_click", {"sandbox_id": sandbox_id, "x": 321, "y": 234})
                assert not clicked.is_error, text_of(clicked)
                assert (await run("xdotool getmouselocation")).startswith("x:321 y:234 ")
                scrolled = await client.call_tool("desktop_scroll", {"sandbox_id": sandbox_id, "x": 50, "y": 60})
                assert not scrolled.is_error and (await run("xdotool getmouselocation")).startswith("x:50 y:60 ")

                # Typing and keys reach the focused window: an editor saves what was typed.
                await client.call_tool("run_command", {"sandbox_id": sandbox_id, "background": True,
                                                       "command": "DISPLAY=:0 mousepad /home/user/typed.txt"})
                for _ in range(120):
                    if (await run("xdotool search --onlyvisible --class mousepad || true")).strip():
                        break
                    await anyio.sleep(0.5)
                await anyio.sleep(1)  # mapped, then focused
                typed = await client.call_tool("desktop_type", {"sandbox_id": sandbox_id, "text": "typed by MCP"})
                assert not typed.is_error, text_of(typed)
                saved = await client.call_tool("desktop_press", {"sandbox_id": sandbox_id, "keys": "ctrl+s"})
                assert not saved.is_error, text_of(saved)
                content = ""
                for _ in range(40):
                    content = await run("cat /home/user/typed.txt 2>/dev/null || true")
                    if content:
                        break
                    await anyio.sleep(0.25)
                assert content.rstrip("\n") == "typed by MCP"

                bad = await client.call_tool("desktop_press", {"sandbox_id": sandbox_id, "keys": "ctrl+c Return"})
                assert bad.is_error and "without spaces" in text_of(bad)
            finally:
                await client.call_tool("kill_sandbox", {"sandbox_id": sandbox_id})

    anyio.run(session)
