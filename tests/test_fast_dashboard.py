"""The web dashboard without a browser or root, on the fake runtime: sign-in and its cookie, sign-out, the
CSRF token and the origin check on every change, scopes deciding what is shown and what is allowed, two
teams seeing only their own sandboxes, usage and keys, a revoked key ending its sessions, and the pinned
front-end files checked against their integrity."""

from __future__ import annotations

import asyncio
import contextlib
import html
import io
import json
import re
import tarfile

import httpx
import pytest
from cryptography.fernet import Fernet
from helpers.fast import TEMPLATE, platform

from corral.config import PlatformSettings
from corral.control.webhooks import Webhooks
from corral.dashboard import assets
from corral.orchestrator import capacity

pytestmark = pytest.mark.anyio

SETTINGS = PlatformSettings(database_url="", pool_size=0, pool_templates=(), prepared_pool_size=0, resume_warm_s=0,
                            resume_warm_max=4, max_timeout_s=0, metrics_interval_s=3600, metrics_kept=10,
                            idle_freeze_s=0, idle_fresh_s=0, idle_breathe_every_s=10, metrics_token="",
                            metrics_public=False)
BASE = "http://corral"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_refills(monkeypatch):
    monkeypatch.setattr(capacity, "REFILL_DELAY_S", 0.01)


@contextlib.asynccontextmanager
async def served(tmp_path):
    """(the API app, the keys service, the control plane); browsers of it come from `client(app)`."""
    async with platform(tmp_path, SETTINGS, webhooks=lambda db: Webhooks(db, Fernet.generate_key())) as served:
        yield served.app, served.keys, served.plane


def client(app) -> httpx.AsyncClient:
    """A browser-like client: it keeps cookies; each test signs in with its own."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 40000)), base_url=BASE)


def hidden_csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def shown(answer: httpx.Response) -> str:
    """The answer's text as a person reads it (the templates escape quotes)."""
    return html.unescape(answer.text)


async def sign_in(http: httpx.AsyncClient, secret: str) -> str:
    """Signs in; returns the session's CSRF token, as the pages carry it."""
    form = await http.get("/dashboard/signin")
    answer = await http.post("/dashboard/signin", data={"key": secret, "csrf_token": hidden_csrf(form.text)})
    assert answer.status_code == 303, answer.text
    page = await http.get("/dashboard/sandboxes")
    assert page.status_code == 200
    return re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)


async def new_sandbox(http: httpx.AsyncClient, secret: str, **metadata) -> str:
    created = await http.post("/v2/sandboxes", headers={"X-API-KEY": secret},
                              json={"templateID": TEMPLATE, "timeout": 60, "metadata": metadata})
    assert created.status_code == 201, created.text
    return created.json()["sandboxID"]


async def test_signing_in_with_a_key_sets_an_httponly_samesite_session_cookie(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        form = await http.get("/dashboard/signin")
        answer = await http.post("/dashboard/signin", data={"key": secret, "csrf_token": hidden_csrf(form.text)})
        assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/sandboxes"
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("corral_session="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
        assert secret not in cookie
        page = await http.get("/dashboard/sandboxes")
        assert page.status_code == 200 and "<h1>Sandboxes</h1>" in page.text


async def test_a_wrong_key_is_refused_with_401_and_a_message(tmp_path):
    async with served(tmp_path) as (app, _, _), client(app) as http:
        form = await http.get("/dashboard/signin")
        answer = await http.post("/dashboard/signin", data={"key": "e2b_" + "0" * 40,
                                                            "csrf_token": hidden_csrf(form.text)})
        assert answer.status_code == 401
        assert "not a valid API key" in answer.text
        assert "corral_session" not in answer.headers.get("set-cookie", "")


async def test_the_signin_form_without_its_token_is_refused(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        answer = await http.post("/dashboard/signin", data={"key": secret})
        assert answer.status_code == 403 and "form expired" in answer.text


async def test_pages_without_a_session_lead_to_the_signin_page(tmp_path):
    async with served(tmp_path) as (app, _, _), client(app) as http:
        for path in ("/dashboard/sandboxes", "/dashboard/usage", "/dashboard/events", "/dashboard/keys"):
            answer = await http.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == f"/dashboard/signin?next={path}"
        partial = await http.get("/dashboard/sandboxes/table", headers={"HX-Request": "true"})
        assert partial.status_code == 401 and partial.headers["hx-redirect"].startswith("/dashboard/signin")


async def test_after_signin_the_next_page_is_only_ever_a_dashboard_page(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        for wanted, landed in (("/dashboard/usage", "/dashboard/usage"), ("//evil.example/x", "/dashboard/sandboxes"),
                               ("https://evil.example/", "/dashboard/sandboxes")):
            form = await http.get("/dashboard/signin")
            answer = await http.post("/dashboard/signin", data={"key": secret, "next": wanted,
                                                                "csrf_token": hidden_csrf(form.text)})
            assert answer.headers["location"] == landed


async def test_a_change_without_the_csrf_token_or_with_a_wrong_one_is_refused(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret)
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            answer = await http.post(f"/dashboard/sandboxes/{sandbox}/kill", headers=headers)
            assert answer.status_code == 403 and "CSRF token" in answer.text
        listed = await http.get("/v2/sandboxes", headers={"X-API-KEY": secret})
        assert [s["sandboxID"] for s in listed.json()] == [sandbox]


async def test_a_change_from_another_origin_is_refused_even_with_the_token(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        csrf = await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret)
        answer = await http.post(f"/dashboard/sandboxes/{sandbox}/kill",
                                 headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
        assert answer.status_code == 403 and "another site" in answer.text


async def test_kill_from_the_dashboard_kills_the_sandbox(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        csrf = await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret)
        answer = await http.post(f"/dashboard/sandboxes/{sandbox}/kill",
                                 headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
        assert answer.status_code == 200 and f"Killed {sandbox}" in answer.text
        assert answer.headers["hx-trigger"] == "sandboxes-changed"
        gone = await http.get(f"/sandboxes/{sandbox}", headers={"X-API-KEY": secret})
        assert gone.status_code == 404


async def test_an_action_that_fails_shows_the_control_planes_error(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        csrf = await sign_in(http, secret)
        answer = await http.post("/dashboard/sandboxes/nosuchsandbox/pause",
                                 headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
        assert answer.status_code == 404 and "sandbox nosuchsandbox not found" in answer.text


async def test_extending_past_the_keys_maximum_timeout_is_refused_as_the_api_refuses_it(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        from corral.control.keys import KeyLimits
        _, secret = await keys.create("alice", limits=KeyLimits(max_timeout_s=120))
        csrf = await sign_in(http, secret)
        sandbox = await new_sandbox(http, secret)
        answer = await http.post(f"/dashboard/sandboxes/{sandbox}/extend", data={"seconds": "300"},
                                 headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
        assert answer.status_code == 400 and "above this API key's maximum of 120s" in shown(answer)


async def test_a_read_only_key_sees_no_action_buttons_and_its_forged_posts_are_refused(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        team = await keys.create_team("shared")
        _, writer = await keys.create("writer", team=team.id)
        _, reader = await keys.create("reader", team=team.id, scopes=["read"])
        sandbox = await new_sandbox(http, writer)
        csrf = await sign_in(http, reader)
        table = await http.get("/dashboard/sandboxes/table")
        assert sandbox in table.text
        assert "hx-post" not in table.text and ">Kill<" not in table.text
        for action in ("kill", "pause", "fork", "snapshot", "extend", "resume"):
            answer = await http.post(f"/dashboard/sandboxes/{sandbox}/{action}",
                                     headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
            assert answer.status_code == 403 and "lacks the 'sandboxes' scope" in shown(answer)
        keys_page = await http.get("/dashboard/keys")
        assert "Create a key" not in keys_page.text and ">Revoke<" not in keys_page.text
        created = await http.post("/dashboard/keys", data={"name": "sneaky", "csrf_token": csrf})
        assert created.status_code == 403 and "lacks the 'admin' scope" in shown(created)
        listed = await http.get("/v2/sandboxes", headers={"X-API-KEY": writer})
        assert [s["sandboxID"] for s in listed.json()] == [sandbox]


async def test_two_teams_see_only_their_own_sandboxes_events_usage_and_keys(tmp_path):
    async with served(tmp_path) as (app, keys, plane), client(app) as alice, client(app) as bob:
        _, alice_key = await keys.create("alice-key", scopes=["admin"])
        _, bob_key = await keys.create("bob-key", scopes=["admin"])
        theirs = await new_sandbox(alice, alice_key, owner="alice")
        await sign_in(alice, alice_key)
        bob_csrf = await sign_in(bob, bob_key)
        await plane.meter.flush()
        for path in ("/dashboard/sandboxes", "/dashboard/sandboxes/table", "/dashboard/events",
                     "/dashboard/events/list", "/dashboard/usage", "/dashboard/keys"):
            seen = await bob.get(path)
            assert seen.status_code == 200
            assert theirs not in seen.text and "alice-key" not in seen.text and "owner=alice" not in seen.text
        assert theirs in (await alice.get("/dashboard/sandboxes/table")).text
        assert theirs in (await alice.get("/dashboard/events/list")).text
        killed = await bob.post(f"/dashboard/sandboxes/{theirs}/kill",
                                headers={"X-CSRF-Token": bob_csrf, "HX-Request": "true"})
        assert killed.status_code == 404
        alice_id = (await keys.verify(alice_key)).id
        revoked = await bob.post(f"/dashboard/keys/{alice_id}/revoke", data={"csrf_token": bob_csrf})
        assert revoked.status_code == 404
        assert await keys.verify(alice_key) is not None
        assert (await alice.get(f"/sandboxes/{theirs}", headers={"X-API-KEY": alice_key})).status_code == 200


async def test_webhook_urls_are_masked_for_keys_without_admin_as_the_api_masks_them(tmp_path):
    async with served(tmp_path) as (app, keys, plane), client(app) as admin, client(app) as reader:
        owner, admin_key = await keys.create("owner", scopes=["admin"])
        _, reader_key = await keys.create("reader", team=owner.team_id, scopes=["read"])
        await plane.webhooks.create(owner.owner, url="https://hooks.example/deliver?token=s3cret", enabled=False)
        await sign_in(admin, admin_key)
        await sign_in(reader, reader_key)
        assert "https://hooks.example/deliver?token=s3cret" in shown(await admin.get("/dashboard/events"))
        seen = shown(await reader.get("/dashboard/events"))
        assert "https://hooks.example/…" in seen and "s3cret" not in seen


async def test_revoking_the_key_ends_its_dashboard_session(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        created, secret = await keys.create("alice")
        await sign_in(http, secret)
        await keys.revoke(created.id)
        answer = await http.get("/dashboard/sandboxes")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/dashboard/signin")


async def test_sign_out_ends_the_session(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        csrf = await sign_in(http, secret)
        cookie = http.cookies.get("corral_session")
        answer = await http.post("/dashboard/signout", data={"csrf_token": csrf})
        assert answer.status_code == 303
        http.cookies.set("corral_session", cookie, domain="corral", path="/dashboard")  # as if kept
        assert (await http.get("/dashboard/sandboxes")).status_code == 303


async def test_an_admin_key_creates_a_key_shown_once_that_the_api_accepts_and_revokes_it(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        admin, secret = await keys.create("admin", scopes=["admin"])
        csrf = await sign_in(http, secret)
        page = await http.post("/dashboard/keys", data={"name": "ci", "scopes": ["read", "sandboxes"],
                                                        "max_timeout_s": "600", "csrf_token": csrf})
        assert page.status_code == 200
        new_secret = re.search(r'id="new-secret"[^>]*value="(e2b_[0-9a-f]{40})"', page.text).group(1)
        made = await keys.verify(new_secret)
        assert made.team_id == admin.team_id and made.scopes == {"read", "sandboxes"}
        assert made.limits.max_timeout_s == 600
        assert new_secret not in (await http.get("/dashboard/keys")).text
        revoked = await http.post(f"/dashboard/keys/{made.id}/revoke", data={"csrf_token": csrf})
        assert revoked.status_code == 200 and "Revoked ci" in revoked.text
        assert await keys.verify(new_secret) is None


async def test_a_key_with_an_unknown_scope_is_refused_with_the_reason(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("admin", scopes=["admin"])
        csrf = await sign_in(http, secret)
        page = await http.post("/dashboard/keys", data={"name": "x", "scopes": ["root"], "csrf_token": csrf})
        assert page.status_code == 400 and "Unknown scope(s) root" in page.text


async def test_the_usage_page_carries_the_teams_cost_per_day_by_template_for_its_charts(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        await new_sandbox(http, secret)
        await asyncio.sleep(0.2)  # some usage to record
        page = await http.get("/dashboard/usage")
        assert page.status_code == 200
        data = json.loads(re.search(r'<script type="application/json" id="chart-1-data">(.*?)</script>',
                                    page.text, re.S).group(1))
        assert len(data["x"]) == 30 and [s["label"] for s in data["series"]] == [TEMPLATE]
        assert data["series"][0]["values"][-1] > 0


async def test_the_sandboxes_table_filters_by_metadata_and_names_a_malformed_filter(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        blue = await new_sandbox(http, secret, colour="blue")
        red = await new_sandbox(http, secret, colour="red")
        table = await http.get("/dashboard/sandboxes/table", params={"metadata": "colour=blue"})
        assert blue in table.text and red not in table.text
        bad = await http.get("/dashboard/sandboxes/table", params={"metadata": "colour"})
        assert "key=value pairs; 'colour' is not one" in shown(bad)


async def test_pages_carry_a_content_security_policy_without_inline_scripts(tmp_path):
    async with served(tmp_path) as (app, keys, _), client(app) as http:
        _, secret = await keys.create("alice")
        await sign_in(http, secret)
        page = await http.get("/dashboard/sandboxes")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert re.search(r"<script(?![^>]*\b(src|type=\"application/json\"))[^>]*>", page.text) is None


async def test_dashboard_routes_stay_out_of_the_api_schema(tmp_path):
    async with served(tmp_path) as (app, _, _):
        assert not [p for p in app.openapi()["paths"] if p.startswith("/dashboard")]


def _tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _package(data: bytes, files=("dist/a.js",)) -> assets.Package:
    import base64
    import hashlib
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    return assets.Package("demo", "1.0.0", "demo", "https://registry.invalid/demo.tgz", integrity, tuple(files))


def test_a_front_end_package_is_extracted_only_when_it_matches_its_locked_integrity(tmp_path):
    data = _tarball({"dist/a.js": b"ok", "dist/b.js": b"not wanted"})
    package = _package(data)
    assets.extract(package, data, tmp_path)
    assert (tmp_path / "demo/dist/a.js").read_bytes() == b"ok" and not (tmp_path / "demo/dist/b.js").exists()
    assert assets.installed(package, tmp_path)
    tampered = _tarball({"dist/a.js": b"evil"})
    with pytest.raises(assets.IntegrityError, match="sha512 mismatch"):
        assets.extract(package, tampered, tmp_path)
    assert (tmp_path / "demo/dist/a.js").read_bytes() == b"ok"


def test_missing_front_end_packages_are_named(tmp_path):
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"packages": [{"name": "demo", "version": "1.0.0", "dir": "demo", "tarball": "x",
                                              "integrity": "sha512-x", "files": ["a.js"]}]}))
    assert assets.missing(tmp_path / "vendor", lock) == ["demo@1.0.0"]


def test_every_locked_front_end_package_is_pinned_to_an_exact_version_and_sha512():
    for package in assets.locked():
        assert re.fullmatch(r"\d+\.\d+\.\d+", package.version)
        assert package.integrity.startswith("sha512-") and package.tarball.startswith("https://registry.npmjs.org/")
        assert package.tarball.endswith(f"-{package.version}.tgz")

