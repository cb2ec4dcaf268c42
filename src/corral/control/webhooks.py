"""Webhooks of a team (E2B's `/events/webhooks`): where the team's events (control/events.py) are POSTed,
signed, retried with exponential backoff, every attempt kept in a delivery log.

The database is the queue. Recording an event only wakes the intake (`listener`); the intake turns the
events past its cursor into pending attempts, one per enabled webhook of the event's team whose filter
matches, in the transaction that moves the cursor. Each webhook with pending attempts has one worker that
makes them one at a time, in event order (a retried attempt holds back the ones after it, so a receiver
sees its events in order). A slow or failing receiver therefore holds back its own webhook only, never the
API that emitted the event, and a restart (or a crash) resumes what was pending: delivery is at least once,
receivers dedupe on the event's `id`.

Signing secrets are sealed with the installation's key (as secrets are, control/secrets.py) and never
returned after the create answer. Redirects are not followed.

Deliveries reach public addresses only, unless the operator allows private ones (`allow_private`): a URL
whose host is an address literal is checked when it is registered, and every delivery resolves the host
itself, refuses it when any of its addresses is not public, and connects to the address it checked
(`PublicAddressesOnly`), so a webhook cannot be aimed at the server's own services, its network or a cloud
metadata service, also not by a name that resolves differently the second time (DNS rebinding)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets as random
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import JSON, Boolean, Float, Index, Integer, LargeBinary, String, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from corral import __version__
from corral.control.api_common import iso
from corral.control.db import Base, Database, EventRow
from corral.control.errors import ApiError
from corral.control.events import TYPES
from corral.control.keys import Owner

log = logging.getLogger("corral.webhooks")

TEST_EVENT = "webhook.test"  # what the test delivery sends; never recorded as an event
MAX_PER_TEAM = 25
MAX_URL_CHARS = 2048
MIN_SECRET_CHARS, MAX_SECRET_CHARS = 16, 512
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

ALLOW_PRIVATE_HINT = "the operator can allow them with CORRAL_WEBHOOKS_ALLOW_PRIVATE=1"
NOT_PUBLIC = "webhooks are delivered to public addresses only, not to loopback, private, link-local, " \
             "multicast or this server's own addresses"

SIGNATURE_HEADER = "X-Corral-Signature"  # t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
E2B_SIGNATURE_HEADER = "e2b-signature"  # E2B's: unpadded URL-safe base64 of SHA-256(secret + body)


class WebhookRow(Base):
    """A team's webhook: where its events go."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, as in E2B
    team_id: Mapped[str] = mapped_column(String(32), index=True)
    key_id: Mapped[str] = mapped_column(String(32))  # the key that registered it
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(String(MAX_URL_CHARS))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    events: Mapped[list | None] = mapped_column(JSON, nullable=True)  # the types it receives; None: all
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)  # Fernet under the installation's key
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class WebhookDeliveryRow(Base):
    """One attempt to deliver one event to one webhook. A pending row is an attempt still to make (at
    `next_attempt_at`); a failed attempt with attempts left is followed by a pending row for the next."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_queue", "webhook_id", "status", "event_seq"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, sent as e2b-delivery-id
    webhook_id: Mapped[str] = mapped_column(String(36))
    event_id: Mapped[str] = mapped_column(String(40))
    event_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)  # EventRow.id; None: a test delivery
    event_type: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)  # 1, 2, ...
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class WebhookIntakeRow(Base):
    """The intake's cursor (one row): the events up to `last_event_seq` have their deliveries queued."""

    __tablename__ = "webhook_intake"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_event_seq: Mapped[int] = mapped_column(Integer)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt n+1 follows a failed attempt n after `first_delay_s * factor ** (n - 1)`: 1, 2, 4 ... 64 s by
    default, 8 attempts over about two minutes."""

    max_attempts: int = 8
    first_delay_s: float = 1.0
    factor: float = 2.0

    def delay_after(self, attempt: int) -> float:
        return self.first_delay_s * self.factor ** (attempt - 1)


@dataclass(frozen=True)
class WebhookInfo:
    id: str
    team_id: str
    name: str
    url: str
    enabled: bool
    events: tuple[str, ...] | None  # None: every type
    created_at: float
    updated_at: float


def _info(row: WebhookRow) -> WebhookInfo:
    return WebhookInfo(row.id, row.team_id, row.name, row.url, row.enabled,
                       None if row.events is None else tuple(row.events), row.created_at, row.updated_at)


# ------------------------------------------------------------------------------------------ wire format


def event_payload(row: EventRow) -> dict[str, Any]:
    """An event as the events API answers it and webhooks receive it: E2B's lifecycle event (version v1).
    Events that are not about a sandbox (builds, spending) carry no sandbox id."""
    data = row.data or {}
    template, _, build = str(data.get("templateID") or "").partition(":")  # "<template>[:<build>]"
    return {"version": "v1", "id": row.event_id, "type": row.type, "eventData": data or None,
            "sandboxId": row.sandbox_id, "sandboxTeamId": row.team_id,
            "sandboxTemplateId": template or None, "sandboxBuildId": data.get("buildID") or build or None,
            "sandboxExecutionId": data.get("executionID"), "timestamp": iso(row.ts)}


def encode(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): the same for every attempt of an event."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def e2b_signature(secret: str, body: bytes) -> str:
    """E2B's `e2b-signature`: SHA-256 of the secret followed by the body, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(secret.encode() + body).digest()).decode().rstrip("=")


def corral_signature(secret: str, body: bytes, timestamp: int) -> str:
    """`X-Corral-Signature`: an HMAC-SHA256 keyed with the secret over `<timestamp>.<body>`, so a receiver
    can also refuse old (replayed) deliveries."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def signed_headers(secret: str, body: bytes, *, webhook_id: str, delivery_id: str, attempt: int,
                   event_type: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "User-Agent": f"Corral-Webhooks/{__version__}",
            "e2b-webhook-id": webhook_id, "e2b-delivery-id": delivery_id, "e2b-signature-version": "v1",
            E2B_SIGNATURE_HEADER: e2b_signature(secret, body),
            SIGNATURE_HEADER: corral_signature(secret, body, int(time.time())),
            "X-Corral-Event-Type": event_type, "X-Corral-Attempt": str(attempt)}


# ------------------------------------------------------------------------------------------ destinations

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CLOUD_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598: carrier-grade NAT
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: an IPv4 address in the last 32 bits


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), which it may reach."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """What `ip` is when deliveries may not reach it by default (None: a public address they may reach)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        why = None if inner is None else address_refusal(inner)
        if why is not None:
            return f"{why} ({inner}) inside an IPv6 address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip in CLOUD_METADATA:
        return "the cloud metadata service's address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "not a public address"
    if is_own_address(ip):
        return "an address of this server"
    return None


def is_own_address(ip: IPAddress) -> bool:
    """Whether `ip` is one of this machine's addresses: the kernel then picks it as the source of a route to
    itself. Connecting a UDP socket only looks the route up; nothing is sent."""
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(ip), 9))
        except OSError:  # no route there: not ours (and a delivery's connect fails by itself)
            return False
        return ipaddress.ip_address(probe.getsockname()[0]) == ip


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host names without DNS: an IP literal, or one of the short IPv4 forms the
    system's resolver also reads as an address (127.1, 2130706433, 0x7f.0.0.1); None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses the system's resolver answers for `host`, in its order, each once."""
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(sockaddr[0]) for *_, sockaddr in found))


class DestinationRefused(Exception):
    """A webhook's host is, or resolves to, an address deliveries may not reach."""

    def __init__(self, host: str, ip: IPAddress, why: str) -> None:
        named = f"{host} is" if literal_address(host) == ip else f"{host} resolves to {ip},"
        super().__init__(f"{named} {why}")


class PublicAddressesOnly(httpcore.AsyncNetworkBackend):
    """Connects deliveries to public addresses only. It resolves the host itself, refuses it
    (DestinationRefused) when any of its addresses is not public, and connects `network` to an address it
    checked, never to the name, so a second lookup cannot send the request elsewhere (DNS rebinding). The
    connection pool still knows the connection by the host's name: TLS sends that name (SNI) and verifies
    the certificate for it, the Host header carries it, and a kept-alive connection serves that name only."""

    def __init__(self, network: httpcore.AsyncNetworkBackend) -> None:
        self._network = network

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve(host, port)
        except OSError as e:  # socket.gaierror: no such name, or the resolver failed (worth a retry)
            raise httpcore.ConnectError(f"cannot resolve {host}: {e.strerror or e}") from e
        for ip in addresses:
            why = address_refusal(ip)
            if why is not None:
                raise DestinationRefused(host, ip, why)
        failure: Exception = httpcore.ConnectError(f"{host} has no addresses")
        for ip in addresses:
            try:
                return await self._network.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                                       socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                failure = e
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("webhooks are delivered over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


# ------------------------------------------------------------------------------------------ validation


def _check_name(name) -> str:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 200:
        raise ApiError(400, "name must be a string of 1-200 characters")
    return name.strip()


def check_url(url, *, allow_private: bool = False) -> str:
    """A webhook's URL: http(s) with a host, and, unless `allow_private`, not an address literal deliveries
    may not reach (a name is checked when a delivery resolves it)."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, "url must be an http:// or https:// URL")
    if len(url) > MAX_URL_CHARS:
        raise ApiError(400, f"url is {len(url)} characters; at most {MAX_URL_CHARS} are allowed")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise ApiError(400, f"url {url[:100]!r} is not a valid URL: {e}") from None
    if parsed.scheme not in ("http", "https"):
        raise ApiError(400, f"url must be an http:// or https:// URL, got {url[:100]!r}")
    if not parsed.host:
        raise ApiError(400, f"url {url[:100]!r} names no host")
    ip = None if allow_private else literal_address(parsed.host)
    why = None if ip is None else address_refusal(ip)
    if why is not None:
        raise ApiError(400, f"url's host {parsed.host} is {why}: {NOT_PUBLIC} ({ALLOW_PRIVATE_HINT})")
    return url


def check_types(types) -> list[str]:
    """Event type names: each known (400 naming the unknown ones and the known ones), duplicates dropped."""
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ApiError(400, "events must be a list of event type names")
    unknown = sorted({t for t in types if t not in TYPES})
    if unknown:
        raise ApiError(400, f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(TYPES)}")
    return list(dict.fromkeys(types))


def _check_events(events) -> list[str] | None:
    if events is None:
        return None
    checked = check_types(events)
    if not checked:
        raise ApiError(400, "events must name at least one event type (leave it out to receive all)")
    return checked


def _check_secret(secret) -> str:
    if not isinstance(secret, str) or not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS:
        raise ApiError(400, f"signatureSecret must be a string of {MIN_SECRET_CHARS}-{MAX_SECRET_CHARS} "
                            f"characters (leave it out and the server makes one)")
    return secret


def _check_enabled(enabled) -> bool:
    if not isinstance(enabled, bool):
        raise ApiError(400, "enabled must be true or false")
    return enabled


KEEP: Any = object()  # an update's field that was not given


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    delivered: bool
    response_status: int | None
    error: str | None
    duration_ms: float = 0.0
    final: bool = False  # not worth another attempt (nothing was sent)


# ------------------------------------------------------------------------------------------ the service


class Webhooks:
    """`retry`, `timeout_s`, `max_in_flight` (requests under way at once, all webhooks together, test
    deliveries too) and `max_pending` (attempts waiting per webhook; beyond it new deliveries are logged as
    failed) bound what deliveries cost; `log_kept_s`: how long finished attempts stay in the delivery log.
    `allow_private`: deliveries may also reach loopback, private, link-local and this server's addresses
    (the operator's opt-in; off, they reach public addresses only). `network`: what opens connections
    (httpcore's AnyIO backend; tests swap it)."""

    INTAKE_BATCH = 200

    def __init__(self, database: Database, key: bytes, *, retry: RetryPolicy | None = None,
                 timeout_s: float = 10.0, max_in_flight: int = 8, max_pending: int = 1000,
                 log_kept_s: float = 7 * 86400, allow_private: bool = False,
                 network: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._db = database
        self._fernet = Fernet(key)
        self.retry = retry or RetryPolicy()
        self.allow_private = allow_private
        self._network = network
        self._timeout_s = timeout_s
        self._max_pending = max_pending
        self._log_kept_s = log_kept_s
        self._max_in_flight = max_in_flight
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._wake = asyncio.Event()
        self._intake: asyncio.Task | None = None
        self._workers: dict[str, asyncio.Task] = {}  # webhook id -> the task making its attempts
        self._kicked: set[str] = set()  # webhooks with attempts queued since their worker last looked
        self._pool: httpcore.AsyncConnectionPool | None = None
        self._pruned_at = 0.0

    # -------------------------------------------------------------------------------------- registrations

    async def create(self, owner: Owner, *, url, name=None, enabled=True, events=None,
                     secret=None) -> tuple[WebhookInfo, str]:
        """The new webhook and its signing secret (made here when none is given); the secret is never
        returned again."""
        url = check_url(url, allow_private=self.allow_private)
        name = _check_name(httpx.URL(url).host if name is None else name)
        enabled, events = _check_enabled(enabled), _check_events(events)
        secret = random.token_urlsafe(32) if secret is None else _check_secret(secret)
        sealed = self._fernet.encrypt(secret.encode())
        now = time.time()

        def add(session: Session) -> WebhookInfo:
            count = session.scalar(select(func.count()).select_from(WebhookRow)
                                   .where(WebhookRow.team_id == owner.team_id))
            if count >= MAX_PER_TEAM:
                raise ApiError(400, f"the team has {count} webhooks, the most it may have; delete one first")
            row = WebhookRow(id=str(uuid.uuid4()), team_id=owner.team_id, key_id=owner.key_id, name=name, url=url,
                             enabled=enabled, events=events, sealed_secret=sealed, created_at=now, updated_at=now)
            session.add(row)
            return _info(row)

        return await self._db.write(add), secret

    async def update(self, owner: Owner, webhook_id: str, *, url=KEEP, name=KEEP, enabled=KEEP, events=KEEP,
                     secret=KEEP) -> WebhookInfo:
        """Replaces the fields given (events=None: every type); the others stay."""
        changes: dict[str, Any] = {}
        if url is not KEEP:
            changes["url"] = check_url(url, allow_private=self.allow_private)
        if name is not KEEP:
            changes["name"] = _check_name(name)
        if enabled is not KEEP:
            changes["enabled"] = _check_enabled(enabled)
        if events is not KEEP:
            changes["events"] = _check_events(events)
        if secret is not KEEP:
            changes["sealed_secret"] = self._fernet.encrypt(_check_secret(secret).encode())

        def change(session: Session) -> WebhookInfo:
            row = _find(session, owner, webhook_id)
            for column, value in changes.items():
                setattr(row, column, value)
            row.updated_at = time.time()
            return _info(row)

        return await self._db.write(change)

    async def get(self, owner: Owner, webhook_id: str) -> WebhookInfo:
        return await self._db.read(lambda session: _info(_find(session, owner, webhook_id)))

    async def list(self, owner: Owner) -> list[WebhookInfo]:
        stmt = (select(WebhookRow).where(WebhookRow.team_id == owner.team_id)
                .order_by(WebhookRow.created_at, WebhookRow.id))
        return await self._db.read(lambda session: [_info(r) for r in session.scalars(stmt)])

    async def delete(self, owner: Owner, webhook_id: str) -> None:
        """The webhook, its pending attempts and its delivery log."""
        def remove(session: Session) -> None:
            row = _find(session, owner, webhook_id)
            session.execute(delete(WebhookDeliveryRow).where(WebhookDeliveryRow.webhook_id == row.id))
            session.delete(row)

        await self._db.write(remove)

    async def deliveries(self, owner: Owner, webhook_id: str, *, limit: int = 50, offset: int = 0,
                         status: str | None = None) -> list[WebhookDeliveryRow]:
        """The webhook's delivery log, newest attempt first."""
        if status is not None and status not in (PENDING, DELIVERED, FAILED):
            raise ApiError(400, f"status must be one of {PENDING}, {DELIVERED}, {FAILED}, got {status!r}")

        def read(session: Session) -> list[WebhookDeliveryRow]:
            _find(session, owner, webhook_id)
            stmt = select(WebhookDeliveryRow).where(WebhookDeliveryRow.webhook_id == webhook_id)
            if status is not None:
                stmt = stmt.where(WebhookDeliveryRow.status == status)
            stmt = stmt.order_by(WebhookDeliveryRow.created_at.desc(), WebhookDeliveryRow.attempt.desc())
            return list(session.scalars(stmt.offset(offset).limit(limit)))

        return await self._db.read(read)

    async def send_test(self, owner: Owner, webhook_id: str) -> WebhookDeliveryRow:
        """Sends a synthetic `webhook.test` event to the webhook now (also when it is disabled), once, and
        answers the attempt, which is in the delivery log too. It takes a place among the deliveries under
        way like any other, waiting for one at most the delivery timeout (then it is logged as not sent)."""
        row = await self._db.read(lambda session: _find(session, owner, webhook_id))
        now = time.time()
        event = EventRow(event_id=str(uuid.uuid4()), team_id=row.team_id, sandbox_id=None, type=TEST_EVENT, ts=now,
                         data={"message": "a test delivery from Corral"})  # never recorded
        attempt = WebhookDeliveryRow(id=str(uuid.uuid4()), webhook_id=row.id, event_id=event.event_id,
                                     event_seq=None, event_type=TEST_EVENT, attempt=1, status=PENDING, created_at=now)
        outcome = await self._post(row, attempt, encode(event_payload(event)), place_within_s=self._timeout_s)
        _settle(attempt, outcome)
        await self._db.write(lambda session: session.add(attempt))
        return attempt

    # -------------------------------------------------------------------------------------- delivery

    def listener(self, event: EventRow) -> None:
        """For `Events.subscribe`: only wakes the intake (never blocks, never fails)."""
        self._wake.set()

    async def start(self) -> None:
        """Starts the intake (from its cursor: events recorded before a crash get their deliveries) and the
        workers of webhooks with pending attempts."""
        if self._intake is not None:
            return
        self._pool = self._new_pool()
        await self._db.write(_open_cursor)
        waiting = await self._db.read(lambda session: list(session.scalars(
            select(WebhookDeliveryRow.webhook_id).where(WebhookDeliveryRow.status == PENDING).distinct())))
        self._intake = asyncio.create_task(self._run_intake(), name="webhook-intake")
        self._wake.set()
        for webhook_id in waiting:
            self._kick(webhook_id)

    async def close(self) -> None:
        """Stops delivering; attempts under way are cancelled and stay pending (made again after a restart)."""
        tasks = [t for t in (self._intake, *self._workers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._intake, self._workers = None, {}
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def _new_pool(self) -> httpcore.AsyncConnectionPool:
        """Connections for deliveries: httpcore's pool (TLS verified against the CA bundle httpx uses), over
        the public-addresses-only check unless the operator allowed private destinations. httpcore and not
        an httpx client, since only a pool can be given the network backend that does the check."""
        network = self._network or httpcore.AnyIOBackend()
        return httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=self._max_in_flight,
            network_backend=network if self.allow_private else PublicAddressesOnly(network))

    async def _run_intake(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                more = True
                while more:
                    queued, more = await self._db.write(self._queue_batch)
                    for webhook_id in queued:
                        self._kick(webhook_id)
                if time.time() - self._pruned_at > 3600:
                    self._pruned_at = time.time()
                    await self._db.write(self._prune)
            except Exception:  # the database failed: the cursor did not move, so the next wake retries
                log.exception("queueing webhook deliveries failed")
                await asyncio.sleep(1)
                self._wake.set()

    def _queue_batch(self, session: Session) -> tuple[set[str], bool]:
        """Pending first attempts for the next events past the cursor, and the cursor moved past them."""
        cursor = session.get(WebhookIntakeRow, 1)
        events = list(session.scalars(select(EventRow).where(EventRow.id > cursor.last_event_seq)
                                      .order_by(EventRow.id).limit(self.INTAKE_BATCH)))
        if not events:
            return set(), False
        hooks = list(session.scalars(select(WebhookRow).where(
            WebhookRow.team_id.in_({e.team_id for e in events}), WebhookRow.enabled.is_(True))))
        waiting = dict(session.execute(
            select(WebhookDeliveryRow.webhook_id, func.count()).where(
                WebhookDeliveryRow.webhook_id.in_([h.id for h in hooks]), WebhookDeliveryRow.status == PENDING)
            .group_by(WebhookDeliveryRow.webhook_id)).all()) if hooks else {}
        queued: set[str] = set()
        now = time.time()
        for event in events:
            for hook in hooks:
                # A webhook receives what happens after it is registered, of the types it asked for.
                if (hook.team_id != event.team_id or hook.created_at > event.ts
                        or (hook.events is not None and event.type not in hook.events)):
                    continue
                attempt = WebhookDeliveryRow(id=str(uuid.uuid4()), webhook_id=hook.id, event_id=event.event_id,
                                             event_seq=event.id, event_type=event.type, attempt=1, status=PENDING,
                                             created_at=now, next_attempt_at=now)
                if waiting.get(hook.id, 0) >= self._max_pending:
                    attempt.status, attempt.next_attempt_at = FAILED, None
                    attempt.error = (f"not sent: {self._max_pending} deliveries to this webhook were already "
                                     f"waiting (its receiver is failing or slow)")
                else:
                    waiting[hook.id] = waiting.get(hook.id, 0) + 1
                    queued.add(hook.id)
                session.add(attempt)
        cursor.last_event_seq = events[-1].id
        return queued, len(events) == self.INTAKE_BATCH

    def _prune(self, session: Session) -> None:
        before = time.time() - self._log_kept_s
        session.execute(delete(WebhookDeliveryRow).where(WebhookDeliveryRow.status != PENDING,
                                                         WebhookDeliveryRow.created_at < before))

    def _kick(self, webhook_id: str) -> None:
        """Makes sure the webhook's worker runs and looks for attempts again."""
        self._kicked.add(webhook_id)
        worker = self._workers.get(webhook_id)
        if worker is None or worker.done():
            self._workers[webhook_id] = asyncio.create_task(self._run_worker(webhook_id),
                                                            name=f"webhook-{webhook_id}")

    async def _run_worker(self, webhook_id: str) -> None:
        """Makes the webhook's pending attempts one at a time, in event order, each at its time."""
        try:
            while True:
                self._kicked.discard(webhook_id)
                found = await self._db.read(lambda session: _next_attempt(session, webhook_id))
                if found is None:
                    if webhook_id in self._kicked:  # queued while we looked
                        continue
                    return
                hook, attempt, event = found
                wait = (attempt.next_attempt_at or 0) - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # the webhook may have changed (or gone) meanwhile: look again
                await self._make(hook, attempt, event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivering to webhook %s failed; it is retried on the next event or restart",
                          webhook_id)
        finally:
            if self._workers.get(webhook_id) is asyncio.current_task():
                del self._workers[webhook_id]

    async def _make(self, hook: WebhookRow, attempt: WebhookDeliveryRow, event: EventRow | None) -> None:
        if not hook.enabled:
            outcome = Outcome(False, None, "not sent: the webhook is disabled", final=True)
        elif event is None:
            outcome = Outcome(False, None, "not sent: the event is no longer recorded", final=True)
        else:
            outcome = await self._post(hook, attempt, encode(event_payload(event)))
        retry = self.retry

        def record(session: Session) -> None:
            row = session.get(WebhookDeliveryRow, attempt.id)
            if row is None or row.status != PENDING:  # the webhook was deleted meanwhile
                return
            _settle(row, outcome)
            if not outcome.delivered and not outcome.final and row.attempt < retry.max_attempts:
                now = time.time()
                session.add(WebhookDeliveryRow(
                    id=str(uuid.uuid4()), webhook_id=row.webhook_id, event_id=row.event_id, event_seq=row.event_seq,
                    event_type=row.event_type, attempt=row.attempt + 1, status=PENDING, created_at=now,
                    next_attempt_at=now + retry.delay_after(row.attempt)))

        await self._db.write(record)

    async def _post(self, hook: WebhookRow, attempt: WebhookDeliveryRow, body: bytes, *,
                    place_within_s: float | None = None) -> Outcome:
        """One POST, bounded in time as a whole (a receiver that answers drop by drop is cut off too), once
        it has a place among the deliveries under way; `place_within_s`: how long to wait for one (None: as
        long as it takes)."""
        try:
            secret = self._fernet.decrypt(hook.sealed_secret).decode()
        except InvalidToken:
            return Outcome(False, None, "not sent: the signing secret cannot be opened with this installation's "
                                        "key (was it replaced?); set a new signatureSecret", final=True)
        url = httpx.URL(hook.url)
        headers = {"Host": url.netloc.decode("ascii"),
                   **signed_headers(secret, body, webhook_id=hook.id, delivery_id=attempt.id,
                                    attempt=attempt.attempt, event_type=attempt.event_type)}
        if url.userinfo:  # credentials in the URL, sent as an HTTP client sends them
            credentials = f"{url.username}:{url.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
        limits = dict.fromkeys(("connect", "read", "write", "pool"), self._timeout_s)
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(place_within_s):
                    await stack.enter_async_context(self._in_flight)
            except TimeoutError:
                return Outcome(False, None, f"not sent: {self._max_in_flight} deliveries (the most at once) were "
                                            f"under way for {place_within_s:g} s; try again", final=True)
            pool = self._pool or await stack.enter_async_context(self._new_pool())
            started = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout_s), \
                        pool.stream("POST", target, headers=headers, content=body,
                                    extensions={"timeout": limits}) as response:
                    excerpt = b""
                    async for chunk in response.aiter_stream():  # a little of what it says, for the log
                        excerpt += chunk
                        if len(excerpt) >= 200:
                            break
            except DestinationRefused as e:
                return Outcome(False, None, f"not sent: {e}; {NOT_PUBLIC} ({ALLOW_PRIVATE_HINT})"[:1000],
                               _ms_since(started), final=True)
            except (TimeoutError, httpcore.TimeoutException):
                return Outcome(False, None, f"no answer within {self._timeout_s:g} s", _ms_since(started))
            except TRANSPORT_ERRORS as e:
                return Outcome(False, None, (f"{type(e).__name__}: {e}")[:1000], _ms_since(started))
            status = response.status
            if 200 <= status < 300:
                return Outcome(True, status, None, _ms_since(started))
            said = excerpt[:200].decode(errors="replace").strip()
            return Outcome(False, status, f"HTTP {status}" + (f": {said}" if said else ""), _ms_since(started))


# What a delivery can fail with below HTTP (httpcore's errors have no common base).
TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                    httpcore.ProxyError)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000


def _settle(row: WebhookDeliveryRow, outcome: Outcome) -> None:
    now = time.time()
    row.status = DELIVERED if outcome.delivered else FAILED
    row.response_status, row.error, row.duration_ms = outcome.response_status, outcome.error, outcome.duration_ms
    row.attempted_at, row.next_attempt_at = now, None
    if outcome.delivered:
        row.delivered_at = now


def _find(session: Session, owner: Owner, webhook_id: str) -> WebhookRow:
    row = session.get(WebhookRow, webhook_id)
    if row is None or row.team_id != owner.team_id:
        raise ApiError(404, f"webhook {webhook_id} not found")
    return row


def _open_cursor(session: Session) -> None:
    """A new installation's intake starts at the newest event: webhooks get what happens from now on."""
    if session.get(WebhookIntakeRow, 1) is None:
        newest = session.scalar(select(func.max(EventRow.id))) or 0
        session.add(WebhookIntakeRow(id=1, last_event_seq=newest))


def _next_attempt(session: Session, webhook_id: str) -> tuple[WebhookRow, WebhookDeliveryRow, EventRow | None] | None:
    hook = session.get(WebhookRow, webhook_id)
    if hook is None:
        return None
    attempt = session.scalar(select(WebhookDeliveryRow).where(
        WebhookDeliveryRow.webhook_id == webhook_id, WebhookDeliveryRow.status == PENDING)
        .order_by(WebhookDeliveryRow.event_seq, WebhookDeliveryRow.attempt).limit(1))
    if attempt is None:
        return None
    event = session.scalar(select(EventRow).where(EventRow.id == attempt.event_seq))
    return hook, attempt, event

