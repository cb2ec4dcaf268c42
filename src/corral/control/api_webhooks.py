"""Routes for a team's events and webhooks, in E2B's shapes where E2B has them: the lifecycle events API
(`GET /events/sandboxes`, `GET /events/sandboxes/{id}`) and webhooks (`/events/webhooks`, `/{id}`).
Corral's own: `GET /events` (every event of the team: also builds and spending), a webhook's delivery log
(`GET /events/webhooks/{id}/deliveries`) and a test delivery (`POST /events/webhooks/{id}/test`).

A webhook's URL and its receivers' answers may carry credentials, so only `admin` keys see them whole: other
keys of the team see the URL's scheme, host and port (path and query masked, userinfo left out) and the
delivery log without the excerpt of the receiver's answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Query, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from corral.control.api_common import ERRORS, Key, iso
from corral.control.errors import ApiError
from corral.control.events import TYPES, Events
from corral.control.keys import ApiKey
from corral.control.scopes import ADMIN
from corral.control.webhooks import (
    DELIVERED,
    FAILED,
    PENDING,
    WebhookDeliveryRow,
    WebhookInfo,
    Webhooks,
    check_types,
    event_payload,
)

SANDBOX_TYPES = tuple(t for t in TYPES if t.startswith("sandbox."))


class NewWebhook(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = Field(default=None, description="1-200 characters; the URL's host when left out")
    url: str = Field(description="http:// or https:// URL the events are POSTed to")
    enabled: bool = True
    events: list[str] | None = Field(default=None, description="The event types it receives; every type "
                                                               "(also ones added later) when left out")
    signatureSecret: str | None = Field(default=None, description=(
        "16-512 characters the deliveries are signed with; made by the server when left out. Write-only: "
        "only the create answer carries it"))


class WebhookUpdate(BaseModel):
    """Fields given replace the webhook's; `events: null` receives every type."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    url: str | None = None
    enabled: bool | None = None
    events: list[str] | None = None
    signatureSecret: str | None = Field(default=None, description="A new signing secret")


class Webhook(BaseModel):
    id: str
    teamID: str
    name: str
    createdAt: str
    updatedAt: str
    enabled: bool
    url: str
    events: list[str]


class CreatedWebhook(Webhook):
    signatureSecret: str = Field(description="What deliveries are signed with; never returned again")


class WebhookDelivery(BaseModel):
    """One attempt to deliver one event (`pending`: still to make, at `nextAttemptAt`)."""

    id: str = Field(description="Sent as the e2b-delivery-id header")
    webhookID: str
    eventID: str
    eventType: str
    attempt: int
    status: str = Field(description="pending, delivered or failed")
    responseStatus: int | None = None
    error: str | None = None
    createdAt: str
    nextAttemptAt: str | None = None
    attemptedAt: str | None = None
    deliveredAt: str | None = None
    durationMs: float | None = None


class TeamEvent(BaseModel):
    """E2B's lifecycle event (version v1), also what a webhook receives. Events that are not about a
    sandbox (template builds, spending) have no sandboxId."""

    version: str
    id: str
    type: str
    eventData: dict[str, Any] | None = None
    sandboxId: str | None = None
    sandboxTeamId: str
    sandboxTemplateId: str | None = None
    sandboxBuildId: str | None = None
    sandboxExecutionId: str | None = None
    timestamp: str


def masked_url(url: str) -> str:
    """The URL as keys without the admin scope see it: scheme, host and port; the path and query (which
    often carry a token) masked, credentials left out."""
    parsed = httpx.URL(url)
    hidden = parsed.raw_path not in (b"", b"/") or parsed.fragment
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}/{'…' if hidden else ''}"


def _webhook(info: WebhookInfo, key: ApiKey) -> dict[str, Any]:
    return dict(id=info.id, teamID=info.team_id, name=info.name, createdAt=iso(info.created_at),
                updatedAt=iso(info.updated_at), enabled=info.enabled,
                url=info.url if key.allows(ADMIN) else masked_url(info.url),
                events=list(TYPES if info.events is None else info.events))


def _delivery(row: WebhookDeliveryRow, key: ApiKey) -> WebhookDelivery:
    def at(ts: float | None) -> str | None:
        return None if ts is None else iso(ts)

    error = row.error
    if row.response_status is not None and not key.allows(ADMIN):
        error = f"HTTP {row.response_status}"  # without the excerpt of what the receiver answered
    return WebhookDelivery(id=row.id, webhookID=row.webhook_id, eventID=row.event_id, eventType=row.event_type,
                           attempt=row.attempt, status=row.status, responseStatus=row.response_status,
                           error=error, createdAt=iso(row.created_at), nextAttemptAt=at(row.next_attempt_at),
                           attemptedAt=at(row.attempted_at), deliveredAt=at(row.delivered_at),
                           durationMs=row.duration_ms)


# Bounded so that it fits the database's integers (an unbounded one answered 500 under the schema fuzzer).
MAX_OFFSET = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Events to skip")]
Limit = Annotated[int, Query(ge=1, le=100, description="Events to answer")]
OrderAsc = Annotated[bool, Query(description="Oldest first (default: newest first)")]
Types = Annotated[list[str] | None, Query(description="Only these types (repeat the parameter for more)")]
Since = Annotated[AwareDatetime | None, Query(description="Corral extension: only events at or after this "
                                                          "RFC 3339 time")]


def webhook_routes(plane: Callable[[], Any]) -> APIRouter:
    """`plane()`: the control plane, whose `events` and `webhooks` (None: 501) the routes use."""
    router = APIRouter(tags=["events"])

    def webhooks_of() -> Webhooks:
        found = getattr(plane(), "webhooks", None)
        if found is None:
            raise ApiError(501, "this server delivers no webhooks")
        return found

    def events_of() -> Events:
        found = getattr(plane(), "events", None)
        if found is None:
            raise ApiError(501, "this server records no events")
        return found

    async def listed(key, *, sandbox_id: str | None, allowed: tuple[str, ...] | None, types: list[str] | None,
                     since: AwareDatetime | None, offset: int, limit: int, order_asc: bool) -> list[TeamEvent]:
        wanted = check_types(types) if types else None
        if allowed is not None:
            outside = sorted(set(wanted or ()) - set(allowed))
            if outside:
                raise ApiError(400, f"{', '.join(outside)}: not sandbox event types (GET /events lists every "
                                    f"type); sandbox types: {', '.join(allowed)}")
            wanted = wanted or list(allowed)
        rows = await events_of().list(key.team_id, sandbox_id=sandbox_id, types=wanted,
                                      since=since.timestamp() if since else None, limit=limit, offset=offset,
                                      newest_first=not order_asc)
        return [TeamEvent(**event_payload(r)) for r in rows]

    @router.get("/events/sandboxes/{sandbox_id}", response_model=list[TeamEvent], responses=ERRORS)
    async def sandbox_events(sandbox_id: str, key: Key, offset: Offset = 0, limit: Limit = 10,
                             orderAsc: OrderAsc = False, types: Types = None,
                             since: Since = None) -> list[TeamEvent]:
        """One sandbox's lifecycle events (kept after it is gone); another team's sandbox has none."""
        return await listed(key, sandbox_id=sandbox_id, allowed=SANDBOX_TYPES, types=types, since=since,
                            offset=offset, limit=limit, order_asc=orderAsc)

    @router.get("/events/sandboxes", response_model=list[TeamEvent], responses=ERRORS)
    async def team_sandbox_events(key: Key, offset: Offset = 0, limit: Limit = 10, orderAsc: OrderAsc = False,
                                  types: Types = None, since: Since = None) -> list[TeamEvent]:
        """The lifecycle events of all the team's sandboxes."""
        return await listed(key, sandbox_id=None, allowed=SANDBOX_TYPES, types=types, since=since,
                            offset=offset, limit=limit, order_asc=orderAsc)

    @router.get("/events", response_model=list[TeamEvent], responses=ERRORS)
    async def team_events(key: Key, offset: Offset = 0, limit: Limit = 10, orderAsc: OrderAsc = False,
                          types: Types = None, since: Since = None) -> list[TeamEvent]:
        """Corral extension: every event of the team (sandboxes, template builds, spending)."""
        return await listed(key, sandbox_id=None, allowed=None, types=types, since=since,
                            offset=offset, limit=limit, order_asc=orderAsc)

    @router.post("/events/webhooks", status_code=201, response_model=CreatedWebhook, responses=ERRORS)
    async def create(body: NewWebhook, key: Key) -> CreatedWebhook:
        info, secret = await webhooks_of().create(key.owner, url=body.url, name=body.name, enabled=body.enabled,
                                                  events=body.events, secret=body.signatureSecret)
        return CreatedWebhook(**_webhook(info, key), signatureSecret=secret)

    @router.get("/events/webhooks", response_model=list[Webhook], responses=ERRORS)
    async def list_webhooks(key: Key) -> list[Webhook]:
        return [Webhook(**_webhook(info, key)) for info in await webhooks_of().list(key.owner)]

    @router.get("/events/webhooks/{webhook_id}", response_model=Webhook, responses=ERRORS)
    async def get(webhook_id: str, key: Key) -> Webhook:
        return Webhook(**_webhook(await webhooks_of().get(key.owner, webhook_id), key))

    @router.patch("/events/webhooks/{webhook_id}", response_model=Webhook, responses=ERRORS)
    async def update(webhook_id: str, body: WebhookUpdate, key: Key) -> Webhook:
        given = body.model_fields_set
        for field in ("name", "url", "enabled", "signatureSecret"):
            if field in given and getattr(body, field) is None:
                raise ApiError(400, f"{field} cannot be null (leave it out to keep it)")
        changes = {name: getattr(body, field) for field, name in (
            ("name", "name"), ("url", "url"), ("enabled", "enabled"), ("events", "events"),
            ("signatureSecret", "secret")) if field in given}
        return Webhook(**_webhook(await webhooks_of().update(key.owner, webhook_id, **changes), key))

    @router.delete("/events/webhooks/{webhook_id}", status_code=200, responses=ERRORS)
    async def delete(webhook_id: str, key: Key) -> Response:
        """Also drops its pending deliveries and its delivery log."""
        await webhooks_of().delete(key.owner, webhook_id)
        return Response(status_code=200)

    @router.get("/events/webhooks/{webhook_id}/deliveries", response_model=list[WebhookDelivery],
                responses=ERRORS)
    async def deliveries(webhook_id: str, key: Key,
                         offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                         limit: Annotated[int, Query(ge=1, le=100)] = 50,
                         status: Annotated[str | None, Query(description=f"{PENDING}, {DELIVERED} or "
                                                                         f"{FAILED}")] = None,
                         ) -> list[WebhookDelivery]:
        """Corral extension: the webhook's delivery log, newest attempt first (kept 7 days)."""
        rows = await webhooks_of().deliveries(key.owner, webhook_id, limit=limit, offset=offset, status=status)
        return [_delivery(r, key) for r in rows]

    @router.post("/events/webhooks/{webhook_id}/test", response_model=WebhookDelivery, responses=ERRORS)
    async def test(webhook_id: str, key: Key) -> WebhookDelivery:
        """Corral extension: sends a `webhook.test` event now, once, and answers how it went (the HTTP
        answer is 200 whether or not the receiver took it: see `status`)."""
        return _delivery(await webhooks_of().send_test(key.owner, webhook_id), key)

    return router
