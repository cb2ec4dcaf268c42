"""API keys: `e2b_` + 40 hex characters (the shape older E2B SDKs check), stored only as SHA-256."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select

from corral.control.db import ApiKeyRow, Database

KEY_SHAPE = re.compile(r"^e2b_[0-9a-f]{40}$")


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None


class KeyNotFound(LookupError):
    pass


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _public(row: ApiKeyRow) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at, revoked_at=row.revoked_at)


class ApiKeys:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def create(self, name: str) -> tuple[ApiKey, str]:
        """Returns the key record and the key itself, which is shown once and never again."""
        secret = "e2b_" + secrets.token_hex(20)
        row = ApiKeyRow(id=secrets.token_hex(8), name=name, prefix=secret[:10], digest=_digest(secret),
                        created_at=time.time(), revoked_at=None)
        await self._db.write(lambda session: session.add(row))
        return _public(row), secret

    async def verify(self, presented: str | None) -> ApiKey | None:
        """The key's record, if it is one of ours and not revoked (looked up on every API request)."""
        if not presented or not KEY_SHAPE.match(presented):
            return None
        digest = _digest(presented)
        row = await self._db.read(
            lambda session: session.scalar(select(ApiKeyRow).where(ApiKeyRow.digest == digest)))
        if row is None or row.revoked_at is not None:
            return None
        return _public(row)

    async def list(self) -> list[ApiKey]:
        rows = await self._db.read(
            lambda session: list(session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))))
        return [_public(r) for r in rows]

    async def revoke(self, key_id: str) -> ApiKey:
        def revoke(session) -> ApiKeyRow:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if row.revoked_at is None:
                row.revoked_at = time.time()
            return row

        return _public(await self._db.write(revoke))
