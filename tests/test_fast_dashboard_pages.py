"""The dashboard's sandbox, tree and templates pages without a browser or root, on the fake runtime: another
team's sandbox, its parts and its checkpoints are 404 (or absent from the tree); files and the terminal need
the `execute` scope; uploads and starts from a node need the CSRF token and their scope; the terminal's
WebSocket is refused without a session, from another origin, without `execute` or for another team's sandbox;
restoring from a node starts a sandbox whose head is that node. (The envd side — terminal, files — is tested
in a real browser against a real server: tests/test_dashboard_sandbox_browser.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
from test_fast_dashboard import client, new_sandbox, quick_refills, served, shown, sign_in  # noqa: F401

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class _Answered(Exception):
    pass


async def websocket_answer(app, path: str, headers: dict[str, str]) -> dict:
    """The first thing the app sends to a WebSocket handshake at `path`: its close (with the code) or accept."""
    sent: list[dict] = []
    asked = False

    async def receive() -> dict:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "websocket.connect"}
        await asyncio.sleep(30)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict) -> None:
        sent.append(message)
        raise _Answered

    path, _, query = path.partition("?")
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 40000), "server": ("corral", 80), "subprotocols": []}
    with contextlib.suppress(_Answered):
        await asyncio.wait_for(app(scope, receive, send), 10)
    return sent[0]


def session_cookie(http) -> str:
    return f"corral_session={http.cookies['corral_session']}"


async def snapshot(http, secret: str, sandbox: str, name: str | None = None) -> str:
    answer = await http.post(f"/sandboxes/{sandbox}/snapshots", headers={"X-API-KEY": secret},
                             json={"name": name} if name else {})
    assert answer.status_code == 201, answer.text
    return answer.json()["snapshotID"]


async def test_the_sandbox_page_shows_its_header_charts_and_place_in_the_tree(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret, purpose="page")
        node = await snapshot(http, secret, sandbox, "first")
        page = await http.get(f"/dashboard/sandboxes/{sandbox}")
        assert page.status_code == 200
        assert "purpose=page" in page.text and 'id="sandbox-metrics"' in page.text
        assert f'/tree?focus={sandbox}#node-{node}' in page.text
        assert 'data-terminal=' in page.text and 'hx-post="/dashboard/sandboxes/' in page.text
        table = await http.get("/dashboard/sandboxes/table")
        assert f'href="/dashboard/sandboxes/{sandbox}"' in table.text


async def test_another_teams_sandbox_page_and_its_parts_are_404(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as alice, client(app) as bob:
        _, alice_key = await keys.create("alice")
        _, bob_key = await keys.create("bob")
        theirs = await new_sandbox(alice, alice_key, owner="alice")
        csrf = await sign_in(bob, bob_key)
        for path in ("", "/metrics.json", "/logs", "/files?path=/", "/files/download?path=/etc/hostname"):
            answer = await bob.get(f"/dashboard/sandboxes/{theirs}{path}")
            assert answer.status_code == 404, path
            assert f"sandbox {theirs} not found" in shown(answer)
        head = await bob.get(f"/dashboard/sandboxes/{theirs}/head")
        assert "owner=alice" not in head.text
        upload = await bob.post(f"/dashboard/sandboxes/{theirs}/files/upload", headers={"X-CSRF-Token": csrf},
                                data={"directory": "/tmp"}, files={"file": ("x.txt", b"x")})
        assert upload.status_code == 404


async def test_files_and_the_terminal_need_the_execute_scope(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        team = await keys.create_team("shared")
        _, writer = await keys.create("writer", team=team.id)
        _, operator = await keys.create("operator", team=team.id, scopes=["sandboxes"])
        sandbox = await new_sandbox(http, writer)
        csrf = await sign_in(http, operator)
        page = await http.get(f"/dashboard/sandboxes/{sandbox}")
        assert "data-terminal=" not in page.text and "lacks the <code>execute</code> scope" in page.text
        listing = await http.get(f"/dashboard/sandboxes/{sandbox}/files?path=/")
        assert listing.status_code == 403 and "lacks the 'execute' scope" in shown(listing)
        download = await http.get(f"/dashboard/sandboxes/{sandbox}/files/download?path=/etc/hostname")
        assert download.status_code == 403 and "lacks the 'execute' scope" in shown(download)
        upload = await http.post(f"/dashboard/sandboxes/{sandbox}/files/upload", headers={"X-CSRF-Token": csrf},
                                 data={"directory": "/tmp"}, files={"file": ("x.txt", b"x")})
        assert upload.status_code == 403 and "lacks the 'execute' scope" in shown(upload)
        socket = await websocket_answer(app, f"/dashboard/sandboxes/{sandbox}/terminal",
                                        {"host": "corral", "origin": "http://corral", "cookie": session_cookie(http)})
        assert socket["type"] == "websocket.close" and socket["code"] == 4403


async def test_an_upload_without_the_csrf_token_is_refused(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret)
        answer = await http.post(f"/dashboard/sandboxes/{sandbox}/files/upload", data={"directory": "/tmp"},
                                 files={"file": ("x.txt", b"x")})
        assert answer.status_code == 403 and "CSRF token" in answer.text


async def test_the_terminal_websocket_without_a_session_is_refused(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        sandbox = await new_sandbox(http, secret)
        socket = await websocket_answer(app, f"/dashboard/sandboxes/{sandbox}/terminal",
                                        {"host": "corral", "origin": "http://corral"})
        assert socket["type"] == "websocket.close" and socket["code"] == 4401


async def test_the_terminal_websocket_from_another_origin_is_refused(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret)
        for origin in ({"origin": "https://evil.example"}, {}):
            socket = await websocket_answer(app, f"/dashboard/sandboxes/{sandbox}/terminal",
                                            {"host": "corral", "cookie": session_cookie(http), **origin})
            assert socket["type"] == "websocket.close" and socket["code"] == 4403
            assert "another site" in socket["reason"]


async def test_the_terminal_websocket_for_another_teams_sandbox_is_refused(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as alice, client(app) as bob:
        _, alice_key = await keys.create("alice")
        _, bob_key = await keys.create("bob")
        theirs = await new_sandbox(alice, alice_key)
        await sign_in(bob, bob_key)
        socket = await websocket_answer(app, f"/dashboard/sandboxes/{theirs}/terminal",
                                        {"host": "corral", "origin": "http://corral", "cookie": session_cookie(bob)})
        assert socket["type"] == "websocket.close" and socket["code"] == 4404


async def test_the_tree_shows_a_forks_parent_and_children_and_only_the_teams_own(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as alice, client(app) as bob:
        _, alice_key = await keys.create("alice")
        _, bob_key = await keys.create("bob")
        sandbox = await new_sandbox(alice, alice_key)
        parent = await snapshot(alice, alice_key, sandbox, "before-fork")
        forked = await alice.post(f"/sandboxes/{sandbox}/fork", headers={"X-API-KEY": alice_key}, json={"count": 2})
        children = [f["sandbox"]["sandboxID"] for f in forked.json()]
        await sign_in(alice, alice_key)
        page = await alice.get(f"/dashboard/tree?focus={sandbox}")
        fork_card = re.search(rf'<li class="node-card fork[^"]*" id="node-(\w+)" data-node-id="\w+" '
                              rf'data-parent-id="{parent}".*?</li>', page.text, re.S)
        assert fork_card is not None
        assert sorted(re.findall(r'data-sandbox-id="(\w+)"', fork_card.group(0))) == sorted([sandbox, *children])
        assert "before-fork" in page.text
        await sign_in(bob, bob_key)
        theirs = await bob.get("/dashboard/tree")
        assert parent not in theirs.text and sandbox not in theirs.text and "No checkpoints yet" in theirs.text


async def test_restoring_from_a_node_starts_a_sandbox_whose_head_is_that_node(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        csrf = await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret)
        node = await snapshot(http, secret, sandbox)
        answer = await http.post(f"/dashboard/tree/{node}/start", headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
        assert answer.status_code == 200 and answer.headers["hx-trigger"] == "tree-changed"
        started = re.search(r"Started (\w+) from", answer.text).group(1)
        lineage = await http.get(f"/checkpoints/{started}/tree", headers={"X-API-KEY": secret})
        at_node = lineage.json()["roots"][0]["sandboxes"]
        assert {"sandboxID": started, "state": "running"} in at_node


async def test_starting_from_a_node_needs_the_csrf_token_the_sandboxes_scope_and_the_teams_node(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http, client(app) as bob:
        owner, secret = await keys.create("alice")
        _, reader = await keys.create("reader", team=owner.team_id, scopes=["read"])
        _, bob_key = await keys.create("bob")
        sandbox = await new_sandbox(http, secret)
        node = await snapshot(http, secret, sandbox)
        await sign_in(http, secret)
        missing = await http.post(f"/dashboard/tree/{node}/start", headers={"HX-Request": "true"})
        assert missing.status_code == 403 and "CSRF token" in missing.text
        reader_csrf = await sign_in(http, reader)
        page = await http.get("/dashboard/tree")
        assert node in page.text and ">Restore<" not in page.text
        refused = await http.post(f"/dashboard/tree/{node}/start", headers={"X-CSRF-Token": reader_csrf})
        assert refused.status_code == 403 and "lacks the 'sandboxes' scope" in shown(refused)
        bob_csrf = await sign_in(bob, bob_key)
        theirs = await bob.post(f"/dashboard/tree/{node}/start",
                                headers={"X-CSRF-Token": bob_csrf, "HX-Request": "true"})
        assert theirs.status_code == 404 and f"checkpoint {node} not found" in theirs.text


async def test_the_templates_page_and_tree_are_in_the_navigation(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        page = await http.get("/dashboard/templates")
        assert page.status_code == 200 and "<h1>Templates</h1>" in page.text
        assert 'href="/dashboard/tree"' in page.text and ">coming<" not in page.text
