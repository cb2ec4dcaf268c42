"""Routes for secrets (E2B's `/secrets`): create, update (a new version), read, list, delete. Values go in
and never come out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from corral.control.api_common import ERRORS, Key, iso, page_offset, page_token
from corral.control.errors import ApiError
from corral.control.secrets import SecretInfo, Secrets

_ERRORS = {**ERRORS, 409: ERRORS[404]}


class NewSecret(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="1-128 letters, digits, '_' or '-'; stored lower-cased")
    value: str = Field(description="Write-only: never returned")
    metadata: dict[str, str] | None = None


class SecretUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    value: str = Field(description="The new value (a new version); write-only")
    metadata: dict[str, str] | None = Field(default=None, description="Replaces the metadata when given; "
                                                                      "kept when left out")


class Secret(BaseModel):
    secretID: str
    name: str
    currentVersion: int
    metadata: dict[str, str]
    createdAt: str
    updatedAt: str


def _answer(info: SecretInfo) -> Secret:
    return Secret(secretID=info.id, name=info.name, currentVersion=info.version, metadata=info.metadata,
                  createdAt=iso(info.created_at), updatedAt=iso(info.updated_at))


def secrets_routes(store: Callable[[], Secrets | None]) -> APIRouter:
    """`store`: the plane's secrets (None on a server without them: 501)."""
    router = APIRouter(tags=["secrets"])

    def secrets_of() -> Secrets:
        found = store()
        if found is None:
            raise ApiError(501, "this server keeps no secrets")
        return found

    @router.post("/secrets", status_code=201, response_model=Secret, responses=_ERRORS)
    async def create(body: NewSecret, key: Key) -> Secret:
        return _answer(await secrets_of().create(key.owner, body.name, body.value, body.metadata))

    @router.post("/secrets/{secret}", response_model=Secret, responses=_ERRORS)
    async def update(secret: str, body: SecretUpdate, key: Key) -> Secret:
        return _answer(await secrets_of().update(key.owner, secret, body.value, body.metadata))

    @router.get("/secrets/{secret}", response_model=Secret, responses=_ERRORS)
    async def get(secret: str, key: Key) -> Secret:
        return _answer(await secrets_of().get(key.owner, secret))

    @router.get("/secrets", response_model=list[Secret], responses=_ERRORS)
    async def list_secrets(
            key: Key, response: Response,
            limit: Annotated[int | None, Query(ge=1, le=100, description="Page size; all when omitted.")] = None,
            nextToken: Annotated[str | None, Query(description="The previous page's `X-Next-Token`.")] = None,
    ) -> list[Secret]:
        rows = await secrets_of().list(key.owner)
        offset = page_offset(nextToken)
        end = len(rows) if limit is None else offset + limit
        if end < len(rows):
            response.headers["X-Next-Token"] = page_token(end)
        return [_answer(r) for r in rows[offset:end]]

    @router.delete("/secrets/{secret}", status_code=204, responses=_ERRORS)
    async def delete(secret: str, key: Key) -> Response:
        await secrets_of().delete(key.owner, secret)
        return Response(status_code=204)

    return router

