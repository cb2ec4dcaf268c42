"""`corral mcp` over stdio, driven by the official `mcp` SDK's client as an agent's MCP client would: its tools
listed with their schemas; a sandbox created, code run with printed output and a chart (an image comes back),
a file written and read, a command's exit code, a failing cell as a tool error the model can read, a preview
URL fetched through Corral's proxy, a fork giving two sandboxes, kill; a wrong key refused as a tool error."""

from __future__ import annotations

import base64
import json
import sys

import anyio
import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from mcp import Client
from mcp.client.stdio import StdioServerParameters
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
