"""Lifecycle events and webhooks, on the fake runtime without root: a real receiver on loopback checks both
signatures of every delivery; retries with backoff until a failing receiver takes the event, all attempts in
the delivery log; a slow receiver holds back neither the API nor other webhooks; order; type filters;
another team's 404s; bad input; the test delivery and the limit on deliveries under way; deliveries across
restarts; public destinations only unless the operator allows private ones (the receivers here are on
loopback, so most servers here allow them); what read-only keys see; the events API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import time

import httpcore
import httpx
import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from helpers.fast import TEMPLATE, platform, until
from sqlalchemy import select

from corral.control import events, webhooks
from corral.control.db import open_database
from corral.control.events import Events
from corral.control.keys import ApiKeys
from corral.control.plane import ControlPlane
from corral.control.webhooks import RetryPolicy, WebhookRow, Webhooks
from corral.orchestrator import capacity

from test_fast_scopes import NEW_SANDBOX, SETTINGS  # isort: skip

pytestmark = pytest.mark.anyio

SECRET = "a-secret-of-the-receiver-0123456789"
QUICK = RetryPolicy(max_attempts=5, first_delay_s=0.05, factor=2.0)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_refills(monkeypatch):
    monkeypatch.setattr(capacity, "REFILL_DELAY_S", 0.01)


# ------------------------------------------------------------------------------------------ the receiver


def e2b_signature_ok(secret: str, body: bytes, header: str) -> bool:
    """As E2B's documentation verifies `e2b-signature`."""
    expected = base64.b64encode(hashlib.sha256(secret.encode() + body).digest()).decode()
    return hmac.compare_digest(expected.replace("+", "-").replace("/", "_").rstrip("="), header)


def corral_signature_ok(secret: str, body: bytes, header: str) -> bool:
    """As docs/operations.md verifies `X-Corral-Signature: t=<unix seconds>,v1=<hex>`."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 300


@dataclasses.dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it came in

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and checks its signatures. `failures`: how many
    requests it answers with 500 before it takes one; while `held` is cleared, requests wait for it to be set."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.received: list[Received] = []
        self.answered = 0
        self.failures = 0
        self.held = asyncio.Event()
        self.held.set()  # set: answer at once
        self.bad_signatures: list[Received] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        got = Received(dict(request.headers), await request.read(), time.monotonic())
        self.received.append(got)
        if not (e2b_signature_ok(self.secret, got.body, got.headers.get("e2b-signature", ""))
                and corral_signature_ok(self.secret, got.body, got.headers.get("X-Corral-Signature", "t=0,v1="))):
            self.bad_signatures.append(got)
        await self.held.wait()
        self.answered += 1
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=500, text="not now")
        return web.Response(status=204)

    def events(self, type: str | None = None) -> list[dict]:
        return [r.event for r in self.received if type is None or r.event["type"] == type]


@contextlib.asynccontextmanager
async def receiver(secret: str = SECRET):
    found = Receiver(secret)
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    found.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield found
    finally:
        found.held.set()
        await runner.cleanup()
    assert found.bad_signatures == [], "deliveries whose signatures did not verify"


# ------------------------------------------------------------------------------------------ the server


@dataclasses.dataclass
class Served:
    http: httpx.AsyncClient
    plane: ControlPlane
    keys: ApiKeys
    webhooks: Webhooks
    admin: dict[str, str]  # an admin key of the team
    reader: dict[str, str]  # a read-only key of the same team
    team_id: str


@contextlib.asynccontextmanager
async def served(tmp_path, retry: RetryPolicy = QUICK, *, allow_private: bool = True, **options):
    """A server whose webhooks may reach loopback receivers (`allow_private`) unless a test says not."""
    def made(database):
        return Webhooks(database, Fernet.generate_key(), retry=retry, allow_private=allow_private, **options)

    async with platform(tmp_path, SETTINGS, webhooks=made) as served:
        keys = served.keys
        admin, secret = await keys.create("admin", scopes=["admin"])
        _, read_secret = await keys.create("reader", team=admin.team_id, scopes=["read"])
        yield Served(served.http, served.plane, keys, served.plane.webhooks, {"X-API-KEY": secret},
                     {"X-API-KEY": read_secret}, admin.team_id)


async def register(s: Served, url: str, **fields) -> dict:
    answer = await s.http.post("/events/webhooks", headers=s.admin,
                               json={"name": "hook", "url": url, "signatureSecret": SECRET, **fields})
    assert answer.status_code == 201, answer.text
    return answer.json()


async def deliveries(s: Served, webhook_id: str, headers: dict[str, str] | None = None) -> list[dict]:
    """The delivery log as the team's read-only key sees it (or as `headers`' key does)."""
    answer = await s.http.get(f"/events/webhooks/{webhook_id}/deliveries", headers=headers or s.reader)
    assert answer.status_code == 200, answer.text
    return answer.json()


# ------------------------------------------------------------------------------------------ deliveries


async def test_a_delivery_carries_the_event_in_e2bs_shape_with_both_signatures(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        hook = await register(s, r.url)
        created = await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)
        sandbox_id = created.json()["sandboxID"]
        await until(lambda: r.events(events.CREATED), what="the created event at the receiver")
        got = r.received[0]
        event = got.event
        assert event["version"] == "v1" and event["type"] == events.CREATED
        assert event["sandboxId"] == sandbox_id and event["sandboxTeamId"] == s.team_id
        assert event["sandboxTemplateId"] == TEMPLATE
        assert event["id"] and event["timestamp"].endswith("Z")
        assert got.headers["e2b-webhook-id"] == hook["id"]
        assert got.headers["e2b-signature-version"] == "v1"
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["e2b-delivery-id"] == (await deliveries(s, hook["id"]))[0]["id"]
        # Both signatures verify (checked by the receiver for every request), and a wrong secret fails them.
        assert not e2b_signature_ok("another-secret-0123456789", got.body, got.headers["e2b-signature"])
        assert not corral_signature_ok("another-secret-0123456789", got.body, got.headers["X-Corral-Signature"])


async def test_a_failing_receiver_gets_retries_with_backoff_until_it_takes_the_event(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        r.failures = 3
        hook = await register(s, r.url)
        await s.plane.events.emit(s.team_id, events.SPENDING_WARNING, data={"percent": 50})
        await until(lambda: r.answered == 4, what="four attempts")
        await until(lambda: _settled(s, hook["id"]), what="the last attempt recorded")
        log = sorted(await deliveries(s, hook["id"]), key=lambda d: d["attempt"])
        assert [(d["attempt"], d["status"], d["responseStatus"]) for d in log] == [
            (1, "failed", 500), (2, "failed", 500), (3, "failed", 500), (4, "delivered", 204)]
        assert log[0]["error"] == "HTTP 500" and log[3]["deliveredAt"]
        assert len({d["eventID"] for d in log}) == 1
        assert [x.headers["X-Corral-Attempt"] for x in r.received] == ["1", "2", "3", "4"]
        assert len({x.body for x in r.received}) == 1  # the same event, byte for byte
        gaps = [b.at - a.at for a, b in zip(r.received, r.received[1:], strict=False)]
        for attempt, gap in enumerate(gaps, start=1):  # each wait at least the backoff after that attempt
            assert gap >= QUICK.delay_after(attempt) * 0.9, (attempt, gaps)


async def _settled(s: Served, webhook_id: str) -> bool:
    return all(d["status"] != "pending" for d in await deliveries(s, webhook_id))


async def test_a_receiver_that_keeps_failing_gets_the_most_attempts_and_then_the_delivery_failed(tmp_path):
    async with served(tmp_path, retry=RetryPolicy(max_attempts=3, first_delay_s=0.02)) as s, receiver() as r:
        r.failures = 1000
        hook = await register(s, r.url)
        await s.plane.events.emit(s.team_id, events.CAP_REACHED)
        await until(lambda: r.answered == 3, what="three attempts")
        await until(lambda: _settled(s, hook["id"]), what="the last attempt recorded")
        log = await deliveries(s, hook["id"])
        assert sorted((d["attempt"], d["status"]) for d in log) == [(1, "failed"), (2, "failed"), (3, "failed")]
        assert all(d["nextAttemptAt"] is None for d in log)
        failed = await s.http.get(f"/events/webhooks/{hook['id']}/deliveries", headers=s.reader,
                                  params={"status": "failed"})
        assert len(failed.json()) == 3


async def test_an_unreachable_receiver_is_logged_with_the_connection_error(tmp_path):
    async with receiver() as r:
        url = r.url
    async with served(tmp_path, retry=RetryPolicy(max_attempts=1)) as s:
        hook = await register(s, url)  # its server is gone: the port refuses connections
        await s.plane.events.emit(s.team_id, events.CAP_REACHED)
        await until(lambda: _settled_with_log(s, hook["id"]), what="the attempt recorded")
        [attempt] = await deliveries(s, hook["id"])
        assert attempt["status"] == "failed" and attempt["responseStatus"] is None
        assert attempt["error"].startswith("ConnectError")


async def _settled_with_log(s: Served, webhook_id: str) -> bool:
    log = await deliveries(s, webhook_id)
    return bool(log) and all(d["status"] != "pending" for d in log)


async def test_a_slow_receiver_does_not_slow_the_api(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        r.held.clear()  # the receiver takes requests but answers none until released
        await register(s, r.url)
        async with asyncio.timeout(60):  # a hang (an API call waiting for the receiver) fails, not stalls
            first = await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)
            await until(lambda: len(r.received) == 1, what="the created event at the receiver")
            # While the receiver sits on that delivery, the API answers creates, kills and event queries.
            second = await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)
            for created in (first, second):
                assert created.status_code == 201
                assert (await s.http.delete(f"/sandboxes/{created.json()['sandboxID']}",
                                            headers=s.admin)).status_code == 204
            listed = await s.http.get("/events/sandboxes", headers=s.reader, params={"limit": 100})
        assert len(listed.json()) == 4
        assert r.answered == 0 and len(r.received) == 1  # all of that before the receiver answered anything
        r.held.set()
        await until(lambda: len(r.events()) == 4, what="the other three events after the release")


async def test_a_slow_receiver_holds_back_only_its_own_webhook(tmp_path):
    async with served(tmp_path) as s, receiver() as slow, receiver() as quick:
        slow.held.clear()
        await register(s, slow.url)
        await register(s, quick.url)
        for percent in (50, 80, 100):
            await s.plane.events.emit(s.team_id, events.SPENDING_WARNING, data={"percent": percent})
        await until(lambda: len(quick.events()) == 3, what="three events at the quick receiver")
        assert len(slow.received) == 1 and slow.answered == 0


async def test_events_arrive_in_the_order_they_happened_also_when_one_is_retried(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        r.failures = 2  # the first event needs three attempts; the ones after it wait for it
        await register(s, r.url)
        emitted = []
        for type in (events.CREATED, events.UPDATED, events.PAUSED, events.RESUMED, events.KILLED):
            emitted.append((await s.plane.events.emit(s.team_id, type, sandbox_id="sbx1")).event_id)
        await until(lambda: len(r.received) == 7, what="seven requests (two failed)")
        assert [e["id"] for e in r.events()] == [emitted[0]] * 3 + emitted[1:]


async def test_a_webhook_receives_only_the_types_it_asked_for(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        hook = await register(s, r.url, events=[events.KILLED])
        created = await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)
        await s.http.delete(f"/sandboxes/{created.json()['sandboxID']}", headers=s.admin)
        # Deliveries go out in event order, so had the created event been queued it would be here first.
        await until(r.events, what="the killed event at the receiver")
        assert [e["type"] for e in r.events()] == [events.KILLED]
        assert [d["eventType"] for d in await deliveries(s, hook["id"])] == [events.KILLED]


async def test_a_webhook_receives_nothing_of_another_team(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        hook = await register(s, r.url)
        other, _ = await s.keys.create("other team")
        await s.plane.events.emit(other.team_id, events.CAP_REACHED)
        await s.plane.events.emit(s.team_id, events.SPENDING_WARNING)
        await until(r.events, what="the team's own event at the receiver")
        assert [e["sandboxTeamId"] for e in r.events()] == [s.team_id]
        assert len(await deliveries(s, hook["id"])) == 1


async def test_a_disabled_webhook_receives_nothing(tmp_path):
    async with served(tmp_path) as s, receiver() as r, receiver() as control:
        hook = await register(s, r.url, enabled=False)
        await register(s, control.url)
        await s.plane.events.emit(s.team_id, events.SPENDING_WARNING)
        await until(control.events, what="the event at the enabled webhook")
        assert r.received == [] and await deliveries(s, hook["id"]) == []


async def test_a_webhook_gets_the_events_after_its_registration_only(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        await s.plane.events.emit(s.team_id, events.SPENDING_WARNING, data={"percent": 50})
        await register(s, r.url)
        later = await s.plane.events.emit(s.team_id, events.SPENDING_WARNING, data={"percent": 80})
        await until(r.events, what="the later event")
        assert [e["id"] for e in r.events()] == [later.event_id]


# ------------------------------------------------------------------------------------------ restarts


@contextlib.asynccontextmanager
async def service(database, key: bytes, retry: RetryPolicy = QUICK):
    """Events and a started webhooks service over `database`, as one server process has them."""
    recorded = Events(database)
    webhooks = Webhooks(database, key, retry=retry, allow_private=True)
    recorded.subscribe(webhooks.listener)
    await webhooks.start()
    try:
        yield recorded, webhooks
    finally:
        await webhooks.close()


async def new_team_webhook(database, key: bytes, url: str) -> tuple[str, str]:
    """(team id, webhook id) of a new team's webhook to `url`."""
    keys = ApiKeys(database)
    admin, _ = await keys.create("admin", scopes=["admin"])
    async with service(database, key) as (_, webhooks):
        info, _ = await webhooks.create(admin.owner, url=url, secret=SECRET)
    return admin.team_id, info.id


async def test_a_pending_delivery_is_made_after_a_restart(tmp_path):
    database, key = open_database(f"sqlite:///{tmp_path / 'corral.db'}"), Fernet.generate_key()
    async with receiver() as r:
        team_id, webhook_id = await new_team_webhook(database, key, r.url)
        r.held.clear()
        async with service(database, key) as (recorded, _):
            event = await recorded.emit(team_id, events.CAP_REACHED)
            await until(lambda: len(r.received) == 1, what="the first attempt under way")
        # That server stopped in the middle of the attempt; the receiver never got to answer it.
        r.held.set()
        async with service(database, key) as (_, webhooks):
            await until(lambda: r.answered == 2, what="the attempt made again by the next server")
            owner = (await ApiKeys(database).list())[0].owner
            await until(lambda: _all_delivered(webhooks, owner, webhook_id), what="the attempt recorded")
        assert [e["id"] for e in r.events()] == [event.event_id, event.event_id]


async def _all_delivered(webhooks: Webhooks, owner, webhook_id: str) -> bool:
    return [d.status for d in await webhooks.deliveries(owner, webhook_id)] == ["delivered"]


async def test_events_recorded_while_no_deliveries_ran_are_delivered_on_start(tmp_path):
    database, key = open_database(f"sqlite:///{tmp_path / 'corral.db'}"), Fernet.generate_key()
    async with receiver() as r:
        team_id, _ = await new_team_webhook(database, key, r.url)
        # Recorded, but the process stopped before it queued their deliveries (no service listens).
        emitted = [(await Events(database).emit(team_id, events.SPENDING_WARNING, data={"percent": p})).event_id
                   for p in (50, 80)]
        async with service(database, key):
            await until(lambda: len(r.events()) == 2, what="both events after the start")
        assert [e["id"] for e in r.events()] == emitted


async def test_a_secret_sealed_under_another_installation_key_is_logged_and_not_retried(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'corral.db'}")
    async with receiver() as r:
        team_id, webhook_id = await new_team_webhook(database, Fernet.generate_key(), r.url)
        async with service(database, Fernet.generate_key()) as (recorded, webhooks):  # the key was replaced
            await recorded.emit(team_id, events.CAP_REACHED)
            owner = (await ApiKeys(database).list())[0].owner
            await until(lambda: _has_log(webhooks, owner, webhook_id), what="the attempt logged")
            [attempt] = await webhooks.deliveries(owner, webhook_id)
        assert attempt.status == "failed" and "cannot be opened with this installation's key" in attempt.error
        assert r.received == []


async def _has_log(webhooks: Webhooks, owner, webhook_id: str) -> bool:
    return any(d.status == "failed" for d in await webhooks.deliveries(owner, webhook_id))


# ------------------------------------------------------------------------------------------ the API


async def test_webhooks_are_created_read_listed_changed_and_deleted(tmp_path):
    async with served(tmp_path) as s:
        created = await register(s, "https://hooks.example/corral", events=[events.CREATED])
        assert created["teamID"] == s.team_id and created["enabled"] is True
        assert created["events"] == [events.CREATED] and created["name"] == "hook"
        url = f"/events/webhooks/{created['id']}"
        got = (await s.http.get(url, headers=s.admin)).json()
        assert got == {k: v for k, v in created.items() if k != "signatureSecret"}
        changed = await s.http.patch(url, headers=s.admin, json={"enabled": False, "events": None,
                                                                 "url": "http://hooks.example/v2"})
        assert changed.status_code == 200, changed.text
        assert changed.json()["enabled"] is False and changed.json()["url"] == "http://hooks.example/v2"
        assert changed.json()["events"] == list(events.TYPES) and changed.json()["name"] == "hook"
        assert [w["id"] for w in (await s.http.get("/events/webhooks", headers=s.reader)).json()] == [created["id"]]
        assert (await s.http.delete(url, headers=s.admin)).status_code == 200
        gone = await s.http.get(url, headers=s.reader)
        assert gone.status_code == 404 and gone.json()["message"] == f"webhook {created['id']} not found"


async def test_the_signing_secret_is_answered_only_on_create_and_stored_sealed(tmp_path):
    async with served(tmp_path) as s:
        made = await s.http.post("/events/webhooks", headers=s.admin, json={"url": "https://hooks.example/x"})
        secret = made.json()["signatureSecret"]
        assert len(secret) >= 32 and made.json()["name"] == "hooks.example"
        url = f"/events/webhooks/{made.json()['id']}"
        for answer in (await s.http.get(url, headers=s.reader),
                       await s.http.patch(url, headers=s.admin, json={"signatureSecret": "b" * 20}),
                       await s.http.get("/events/webhooks", headers=s.reader)):
            assert "signatureSecret" not in answer.text and secret not in answer.text
        sealed = await s.plane._db.read(lambda session: session.scalar(select(WebhookRow.sealed_secret)))
        assert secret.encode() not in sealed and b"b" * 20 not in sealed


async def test_another_teams_key_gets_404_on_a_webhook(tmp_path):
    async with served(tmp_path) as s:
        hook = await register(s, "https://hooks.example/corral")
        _, stranger = await s.keys.create("stranger", scopes=["admin"])
        headers = {"X-API-KEY": stranger}
        base = f"/events/webhooks/{hook['id']}"
        for method, path in (("GET", base), ("PATCH", base), ("DELETE", base), ("GET", f"{base}/deliveries"),
                             ("POST", f"{base}/test")):
            answer = await s.http.request(method, path, headers=headers, json={"enabled": False})
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["message"] == f"webhook {hook['id']} not found"
        assert (await s.http.get("/events/webhooks", headers=headers)).json() == []
        assert (await s.http.get(base, headers=s.reader)).json()["enabled"] is True


BAD_WEBHOOKS = [
    ({"url": "ftp://hooks.example/x"}, "url must be an http:// or https:// URL, got 'ftp://hooks.example/x'"),
    ({"url": "https://"}, "names no host"),
    ({"url": "https://hooks.example/" + "x" * 2048}, "at most 2048 are allowed"),
    ({}, "url: Field required"),
    ({"url": "https://hooks.example", "events": ["sandbox.exploded"]},
     "unknown event type(s) sandbox.exploded; known: sandbox.lifecycle.created"),
    ({"url": "https://hooks.example", "events": []}, "events must name at least one event type"),
    ({"url": "https://hooks.example", "signatureSecret": "short"}, "signatureSecret must be a string of 16-512"),
    ({"url": "https://hooks.example", "name": ""}, "name must be a string of 1-200 characters"),
    ({"url": "https://hooks.example", "enabled": "sometimes"}, "enabled: Input should be a valid boolean"),
]


@pytest.mark.parametrize(("body", "message"), BAD_WEBHOOKS, ids=[m[:30] for _, m in BAD_WEBHOOKS])
async def test_a_bad_webhook_is_refused_with_400_saying_what_is_wrong(tmp_path, body, message):
    async with served(tmp_path) as s:
        answer = await s.http.post("/events/webhooks", headers=s.admin, json=body)
        assert answer.status_code == 400, answer.text
        assert message in answer.json()["message"]
        assert (await s.http.get("/events/webhooks", headers=s.reader)).json() == []


@pytest.mark.parametrize(("body", "message"), [
    ({"url": None}, "url cannot be null (leave it out to keep it)"),
    ({"url": "file:///etc/passwd"}, "url must be an http:// or https:// URL"),
    ({"events": ["nope"]}, "unknown event type(s) nope"),
])
async def test_a_bad_change_is_refused_with_400_and_changes_nothing(tmp_path, body, message):
    async with served(tmp_path) as s:
        hook = await register(s, "https://hooks.example/corral")
        answer = await s.http.patch(f"/events/webhooks/{hook['id']}", headers=s.admin, json=body)
        assert answer.status_code == 400 and message in answer.json()["message"]
        kept = (await s.http.get(f"/events/webhooks/{hook['id']}", headers=s.admin)).json()
        assert kept["url"] == hook["url"] and kept["events"] == hook["events"]


async def test_a_read_key_cannot_create_a_webhook(tmp_path):
    async with served(tmp_path) as s:
        answer = await s.http.post("/events/webhooks", headers=s.reader, json={"url": "https://hooks.example"})
        assert answer.status_code == 403 and "lacks the 'admin' scope" in answer.json()["message"]


async def test_the_test_endpoint_sends_a_signed_test_event_and_answers_how_it_went(tmp_path):
    async with served(tmp_path) as s, receiver() as r:
        hook = await register(s, r.url, enabled=False)  # a test goes out also while disabled
        tested = await s.http.post(f"/events/webhooks/{hook['id']}/test", headers=s.admin)
        assert tested.status_code == 200, tested.text
        assert tested.json()["status"] == "delivered" and tested.json()["responseStatus"] == 204
        assert [e["type"] for e in r.events()] == ["webhook.test"]
        r.failures = 1
        failed = (await s.http.post(f"/events/webhooks/{hook['id']}/test", headers=s.admin)).json()
        assert failed["status"] == "failed" and failed["error"] == "HTTP 500: not now"
        assert [d["id"] for d in await deliveries(s, hook["id"])] == [failed["id"], tested.json()["id"]]


async def test_a_test_delivery_waits_for_a_place_among_the_deliveries_under_way(tmp_path):
    async with served(tmp_path, max_in_flight=1) as s, receiver() as slow, receiver() as quick:
        slow.held.clear()
        await register(s, slow.url)
        hook = await register(s, quick.url, events=[events.KILLED])  # not the event that takes the place
        await s.plane.events.emit(s.team_id, events.SPENDING_WARNING)
        await until(lambda: len(slow.received) == 1, what="the event's delivery under way (the one place)")
        tested = asyncio.create_task(s.http.post(f"/events/webhooks/{hook['id']}/test", headers=s.admin))
        await asyncio.sleep(0.3)  # time enough for a test delivery that skipped the limit to arrive
        assert quick.received == []
        released_at = time.monotonic()
        slow.held.set()
        answer = await tested
        assert answer.status_code == 200 and answer.json()["status"] == "delivered", answer.text
        assert [e["type"] for e in quick.events()] == ["webhook.test"]
        assert quick.received[0].at >= released_at


# ------------------------------------------------------------------------------------------ destinations


NOT_PUBLIC = [
    ("127.0.0.1", "a loopback address"),
    ("[::1]", "a loopback address"),
    ("2130706433", "a loopback address"),  # 127.0.0.1 written as one number, which resolvers accept
    ("10.1.2.3", "a private address"),
    ("172.16.0.1", "a private address"),
    ("192.168.1.10", "a private address"),
    ("[fd00::1]", "a private address"),
    ("100.64.0.1", "a shared (carrier-grade NAT) address"),
    ("169.254.169.254", "the cloud metadata service's address"),
    ("[::ffff:169.254.169.254]", "the cloud metadata service's address (169.254.169.254) inside an IPv6 address"),
    ("169.254.10.1", "a link-local address"),
    ("[fe80::1]", "a link-local address"),
    ("0.0.0.0", "the unspecified address"),
    ("224.0.0.1", "a multicast address"),
]


@pytest.mark.parametrize(("host", "what"), NOT_PUBLIC, ids=[h for h, _ in NOT_PUBLIC])
async def test_a_webhook_to_an_address_that_is_not_public_is_refused_with_400(tmp_path, host, what):
    async with served(tmp_path, allow_private=False) as s:
        answer = await s.http.post("/events/webhooks", headers=s.admin, json={"url": f"http://{host}:8080/hook"})
        assert answer.status_code == 400, answer.text
        message = answer.json()["message"]
        assert f"url's host {host.strip('[]')} is {what}: webhooks are delivered to public addresses only" in message
        assert "the operator can allow them with CORRAL_WEBHOOKS_ALLOW_PRIVATE=1" in message
        assert (await s.http.get("/events/webhooks", headers=s.reader)).json() == []


async def test_a_change_to_an_address_that_is_not_public_is_refused_with_400(tmp_path):
    async with served(tmp_path, allow_private=False) as s:
        hook = await register(s, "https://hooks.example/corral")
        answer = await s.http.patch(f"/events/webhooks/{hook['id']}", headers=s.admin,
                                    json={"url": "http://169.254.169.254/latest/meta-data/"})
        assert answer.status_code == 400
        assert "url's host 169.254.169.254 is the cloud metadata service's address" in answer.json()["message"]
        kept = (await s.http.get(f"/events/webhooks/{hook['id']}", headers=s.admin)).json()
        assert kept["url"] == "https://hooks.example/corral"


async def test_the_operator_can_allow_private_destinations(tmp_path):
    async with served(tmp_path, allow_private=True) as s:
        answer = await s.http.post("/events/webhooks", headers=s.admin, json={"url": "http://10.1.2.3/hook"})
        assert answer.status_code == 201, answer.text


LOOPBACK_NAME = re.compile(r"^not sent: localhost resolves to (127\.0\.0\.1|::1), a loopback address; webhooks "
                           r"are delivered to public addresses only.*CORRAL_WEBHOOKS_ALLOW_PRIVATE=1\)$")


async def test_a_name_that_resolves_to_loopback_is_refused_at_delivery_logged_and_not_retried(tmp_path):
    async with served(tmp_path, allow_private=False) as s, receiver() as r:
        hook = await register(s, r.url.replace("127.0.0.1", "localhost"))  # a name: accepted, checked when sent
        await s.plane.events.emit(s.team_id, events.CAP_REACHED)
        await until(lambda: _settled_with_log(s, hook["id"]), what="the attempt recorded")
        [attempt] = await deliveries(s, hook["id"])  # one attempt, no retry queued after it
        assert attempt["status"] == "failed" and attempt["responseStatus"] is None
        assert LOOPBACK_NAME.match(attempt["error"]), attempt["error"]
        assert r.received == []


async def test_a_test_delivery_to_a_name_that_resolves_to_loopback_is_refused(tmp_path):
    async with served(tmp_path, allow_private=False) as s, receiver() as r:
        hook = await register(s, r.url.replace("127.0.0.1", "localhost"))
        tested = (await s.http.post(f"/events/webhooks/{hook['id']}/test", headers=s.admin)).json()
        assert tested["status"] == "failed" and LOOPBACK_NAME.match(tested["error"]), tested
        assert r.received == []


class RecordingNetwork(httpcore.AsyncNetworkBackend):
    """Stands in for the network below the address check: records where deliveries connect, the name TLS is
    started for and the bytes sent, and answers 204 (no traffic leaves the process)."""

    def __init__(self) -> None:
        self.connected: list[tuple[str, int]] = []
        self.tls_names: list[str | None] = []
        self.sent = b""

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connected.append((host, port))
        return RecordingStream(self)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class RecordingStream(httpcore.AsyncNetworkStream):
    def __init__(self, network: RecordingNetwork) -> None:
        self.network = network
        self.answer = b"HTTP/1.1 204 No Content\r\n\r\n"

    async def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        self.network.tls_names.append(server_hostname)
        return self

    async def write(self, buffer: bytes, timeout=None) -> None:
        self.network.sent += buffer

    async def read(self, max_bytes: int, timeout=None) -> bytes:
        answer, self.answer = self.answer, b""
        return answer

    async def aclose(self) -> None:
        pass


async def test_a_delivery_connects_to_the_address_it_checked_and_names_the_host_in_tls_and_http(
        tmp_path, monkeypatch):
    lookups = []

    async def rebinding_resolver(host: str, port: int):
        """Answers a public address first and loopback after (a rebinding attack)."""
        lookups.append(host)
        return [ipaddress.ip_address("1.2.3.4" if len(lookups) == 1 else "127.0.0.1")]

    monkeypatch.setattr(webhooks, "resolve", rebinding_resolver)
    network = RecordingNetwork()
    async with served(tmp_path, allow_private=False, network=network) as s:
        hook = await register(s, "https://hooks.example.net/corral")
        tested = (await s.http.post(f"/events/webhooks/{hook['id']}/test", headers=s.admin)).json()
        assert tested["status"] == "delivered", tested
    assert lookups == ["hooks.example.net"]
    assert network.connected == [("1.2.3.4", 443)]  # the checked address; the name is not looked up again
    assert network.tls_names == ["hooks.example.net"]  # SNI and certificate verification for the name
    assert network.sent.startswith(b"POST /corral HTTP/1.1\r\nHost: hooks.example.net\r\n")


def test_the_servers_own_addresses_are_recognised():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a route lookup only: nothing is sent
        except OSError:
            pytest.skip("this machine has no IPv4 route, so no address of its own to look for")
        own = ipaddress.ip_address(probe.getsockname()[0])
    assert webhooks.is_own_address(own) and webhooks.is_own_address(ipaddress.ip_address("127.0.0.1"))
    assert not webhooks.is_own_address(ipaddress.ip_address("1.2.3.4"))


# ------------------------------------------------------------------------------------------ what keys see


async def test_a_read_only_key_sees_a_webhook_url_without_credentials_path_or_query(tmp_path):
    async with served(tmp_path) as s:
        url = "https://user:pa55word@hooks.example.com:8443/hooks/abc?token=s3cret"
        hook = await register(s, url)
        assert hook["url"] == url
        path = f"/events/webhooks/{hook['id']}"
        assert (await s.http.get(path, headers=s.admin)).json()["url"] == url
        for answer in (await s.http.get(path, headers=s.reader), await s.http.get("/events/webhooks",
                                                                                   headers=s.reader)):
            assert "https://hooks.example.com:8443/…" in answer.text
            assert "s3cret" not in answer.text and "pa55word" not in answer.text and "/hooks/abc" not in answer.text


async def test_the_delivery_log_shows_the_receivers_answer_to_admin_keys_only(tmp_path):
    async with served(tmp_path, retry=RetryPolicy(max_attempts=1)) as s, receiver() as r:
        r.failures = 1
        hook = await register(s, r.url)
        await s.plane.events.emit(s.team_id, events.CAP_REACHED)
        await until(lambda: _settled_with_log(s, hook["id"]), what="the attempt recorded")
        [read] = await deliveries(s, hook["id"])
        [admin] = await deliveries(s, hook["id"], headers=s.admin)
        assert (read["responseStatus"], read["error"]) == (500, "HTTP 500")
        assert (admin["responseStatus"], admin["error"]) == (500, "HTTP 500: not now")


# ------------------------------------------------------------------------------------------ events API


async def test_a_sandboxs_created_and_killed_events_are_listed_for_it(tmp_path):
    async with served(tmp_path) as s:
        sandbox_id = (await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)).json()["sandboxID"]
        await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)  # another sandbox's events
        assert (await s.http.delete(f"/sandboxes/{sandbox_id}", headers=s.admin)).status_code == 204
        url = f"/events/sandboxes/{sandbox_id}"
        newest_first = (await s.http.get(url, headers=s.reader)).json()
        assert [e["type"] for e in newest_first] == [events.KILLED, events.CREATED]
        assert {e["sandboxId"] for e in newest_first} == {sandbox_id}
        oldest_first = (await s.http.get(url, headers=s.reader, params={"orderAsc": "true"})).json()
        assert oldest_first == newest_first[::-1]
        _, stranger = await s.keys.create("stranger")
        assert (await s.http.get(url, headers={"X-API-KEY": stranger})).json() == []


async def test_team_events_include_spending_and_the_sandbox_events_do_not(tmp_path):
    async with served(tmp_path) as s:
        await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)
        await s.plane.events.emit(s.team_id, events.SPENDING_WARNING, data={"percent": 80})
        every = (await s.http.get("/events", headers=s.reader)).json()
        assert [e["type"] for e in every] == [events.SPENDING_WARNING, events.CREATED]
        assert every[0]["eventData"] == {"percent": 80} and every[0]["sandboxId"] is None
        sandboxes = (await s.http.get("/events/sandboxes", headers=s.reader)).json()
        assert [e["type"] for e in sandboxes] == [events.CREATED]


async def test_events_are_filtered_by_type_and_paged(tmp_path):
    async with served(tmp_path) as s:
        for percent in (50, 80, 100):
            await s.plane.events.emit(s.team_id, events.SPENDING_WARNING, data={"percent": percent})
        await s.plane.events.emit(s.team_id, events.CAP_REACHED)
        page = await s.http.get("/events", headers=s.reader, params={
            "types": events.SPENDING_WARNING, "orderAsc": "true", "offset": 1, "limit": 1})
        assert [e["eventData"]["percent"] for e in page.json()] == [80]
        both = await s.http.get("/events", headers=s.reader,
                                params=[("types", events.CAP_REACHED), ("types", events.SPENDING_WARNING)])
        assert len(both.json()) == 4


@pytest.mark.parametrize(("path", "params", "message"), [
    ("/events", {"types": "sandbox.exploded"}, "unknown event type(s) sandbox.exploded"),
    ("/events/sandboxes", {"types": events.SPENDING_WARNING}, "not sandbox event types"),
    ("/events", {"limit": 101}, "limit: Input should be less than or equal to 100"),
    ("/events", {"since": "yesterday"}, "since: Input should be a valid datetime"),
])
async def test_a_bad_events_query_is_refused_with_400_saying_what_is_wrong(tmp_path, path, params, message):
    async with served(tmp_path) as s:
        answer = await s.http.get(path, headers=s.reader, params=params)
        assert answer.status_code == 400 and message in answer.json()["message"], answer.text


async def test_spending_warnings_and_the_cap_reach_a_webhook_in_order(tmp_path):
    """Metering's own events (recorded in its flush's transaction) are delivered like any other."""
    from corral.control.metering import Prices

    async with served(tmp_path) as s, receiver() as r:
        await register(s, r.url)
        s.plane.meter.prices = Prices(vcpu_hour=3600.0, memory_gib_hour=0.0, disk_gib_hour=0.0,
                                      snapshot_gib_hour=0.0)  # 1 per vCPU-second
        await s.keys.update_team(s.team_id, budget=2.0, warn_at=[50, 80])
        sandbox_id = (await s.http.post("/sandboxes", headers=s.admin, json=NEW_SANDBOX)).json()["sandboxID"]
        started = (await s.plane.sandboxes.row(sandbox_id)).started_at
        for seconds in (0.6, 0.9, 1.2):  # 2 vCPUs: 60 %, 90 %, 120 % of the budget
            s.plane.meter.clock = lambda seconds=seconds: started + seconds
            await s.plane.meter.flush()
        await until(lambda: len(r.events(events.CAP_REACHED)) == 1, what="the cap at the receiver")
        spending = [(e["type"], e["eventData"]["percent"]) for e in r.events() if e["type"].startswith("team.")]
        assert spending == [(events.SPENDING_WARNING, 50), (events.SPENDING_WARNING, 80),
                            (events.CAP_REACHED, 100)]
