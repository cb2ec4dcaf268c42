"""What the API's route modules share: authentication, the Sandbox answer, time and page-token formats."""

from __future__ import annotations

import base64
import datetime as dt
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, Header, Request

from corral.control import schemas
from corral.control.db import SandboxRow
from corral.control.errors import ApiError
from corral.control.keys import ApiKey
from corral.control.scopes import EXECUTE, ROUTE_SCOPES
from corral.envd import ENVD_VERSION

CLIENT_ID = "corral"
ERRORS = {401: {"model": schemas.Error}, 403: {"model": schemas.Error}, 404: {"model": schemas.Error},
          400: {"model": schemas.Error}}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def iso(ts: float) -> str:
    """RFC 3339 in UTC, cut (never rounded up) to microseconds: a time read back from an answer and
    passed as a lower bound (`startedAfter`) must still include what it was read from."""
    micros = int(Decimal(ts) * 1_000_000)  # Decimal holds the float's exact value; int() cuts
    return (_EPOCH + dt.timedelta(microseconds=micros)).isoformat().replace("+00:00", "Z")


def envd_token_for(key: ApiKey, row: SandboxRow) -> str | None:
    """The sandbox's envd access token, which lets its holder run anything inside: only for keys with the
    `execute` scope (without it the SDK's commands and files get 401 from envd)."""
    return row.envd_token if key.allows(EXECUTE) else None


def traffic_token_for(key: ApiKey, row: SandboxRow) -> str | None:
    """The token that opens the sandbox's private ports through the proxy: like the envd token, only for
    keys with the `execute` scope."""
    return (row.ingress or {}).get("trafficToken") if key.allows(EXECUTE) else None


def sandbox_answer(row: SandboxRow, key: ApiKey, domain: str | None = None) -> schemas.Sandbox:
    """`domain`: where the SDK reaches the sandbox (`https://<port>-<id>.<domain>`) when it was not told."""
    return schemas.Sandbox(templateID=row.template.partition(":")[0], sandboxID=row.id, alias=row.template,
                           clientID=CLIENT_ID,
                           envdVersion=ENVD_VERSION, envdAccessToken=envd_token_for(key, row), domain=domain,
                           trafficAccessToken=traffic_token_for(key, row))


def page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def page_offset(token: str | None) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "o" or not 0 <= int(value) < 2**31:  # within the database's integers
            raise ValueError
        return int(value)
    except ValueError:
        raise ApiError(400, "nextToken is not a token this server issued") from None


async def authenticated(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> ApiKey:
    """The request's key, if it is valid and holds the scope its route needs (control/scopes.py): 401
    without a valid key, 403 naming the missing scope. A route missing from the table is refused."""
    key = await request.app.state.keys.verify(x_api_key)
    if key is None:
        raise ApiError(401, "Invalid API key" if x_api_key else "Missing X-API-KEY header")
    route = request.scope.get("route")
    method = "GET" if request.method == "HEAD" else request.method
    needed = ROUTE_SCOPES.get((method, getattr(route, "path_format", "")))  # the path without converters
    if needed is None:
        raise ApiError(403, "this route has no scope in the server's table: refused for every key")
    if not key.allows(needed):
        raise ApiError(403, f"this API key lacks the '{needed}' scope ({', '.join(sorted(key.scopes))} held)")
    return key


Key = Annotated[ApiKey, Depends(authenticated)]
