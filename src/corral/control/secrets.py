"""Secrets (E2B's `/secrets`): values a sandbox's egress rules may send (`${e2b.secrets.<name>}` in header
rules) without the value ever entering the sandbox. Values are write-only: stored encrypted (Fernet:
AES-128-CBC with HMAC-SHA256, from `cryptography`) under a key the operator holds, never returned, never
logged.

    <data>/secrets.key   the key (made at first use, 0600), or the file CORRAL_SECRETS_KEY_FILE names

Losing the key loses the values (they are not recoverable without it); the names and metadata stay."""

from __future__ import annotations

import os
import re
import secrets as random
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.control.db import Database, SecretRow
from corral.control.errors import ApiError
from corral.control.keys import Owner

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
MAX_VALUE_BYTES = 64 * 1024
MAX_METADATA_ENTRIES, MAX_KEY_BYTES, MAX_VALUE_META_BYTES, MAX_METADATA_BYTES = 32, 128, 1024, 8192


def load_key(path: Path) -> bytes:
    """The installation's secrets key, made on first use (only root can read it)."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


@dataclass(frozen=True)
class SecretInfo:
    id: str
    name: str
    version: int
    metadata: dict[str, str]
    created_at: float
    updated_at: float


def _info(row: SecretRow) -> SecretInfo:
    return SecretInfo(row.id, row.name, row.version, dict(row.secret_metadata or {}), row.created_at, row.updated_at)


def _check_metadata(metadata: dict | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ApiError(400, "metadata must map strings to strings")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ApiError(400, f"metadata has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES} are allowed")
    total = 0
    for key, value in metadata.items():
        if len(key.encode()) > MAX_KEY_BYTES or len(value.encode()) > MAX_VALUE_META_BYTES:
            raise ApiError(400, f"metadata key {key[:40]!r}: keys are limited to {MAX_KEY_BYTES} bytes and values to "
                                f"{MAX_VALUE_META_BYTES}")
        total += len(key.encode()) + len(value.encode())
    if total > MAX_METADATA_BYTES:
        raise ApiError(400, f"metadata is {total} bytes; at most {MAX_METADATA_BYTES} are allowed")
    return dict(metadata)


def _check_value(value) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "value must be a string")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise ApiError(400, f"value is {len(value.encode())} bytes; at most {MAX_VALUE_BYTES} are allowed")
    return value


class Secrets:
    def __init__(self, database: Database, key: bytes) -> None:
        self._db = database
        self._fernet = Fernet(key)

    async def create(self, owner: Owner, name, value, metadata: dict | None) -> SecretInfo:
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(400, "name must be 1-128 characters of letters, digits, '_' and '-'")
        name = name.lower()
        if name.startswith("sec_"):
            raise ApiError(400, "names starting with 'sec_' are reserved for secret ids")
        sealed = self._fernet.encrypt(_check_value(value).encode())
        metadata = _check_metadata(metadata)
        now = time.time()

        def add(session: Session) -> SecretInfo:
            if session.scalar(select(SecretRow).where(SecretRow.team_id == owner.team_id, SecretRow.name == name)):
                raise ApiError(409, f"a secret named {name!r} exists already")
            row = SecretRow(id="sec_" + random.token_hex(10), key_id=owner.key_id, team_id=owner.team_id,
                            name=name, sealed=sealed, version=1,
                            secret_metadata=metadata, created_at=now, updated_at=now)
            session.add(row)
            return _info(row)

        return await self._db.write(add)

    async def update(self, owner: Owner, ref: str, value, metadata: dict | None) -> SecretInfo:
        """A new value (and version); metadata replaced when given, kept when not."""
        sealed = self._fernet.encrypt(_check_value(value).encode())
        metadata = None if metadata is None else _check_metadata(metadata)

        def change(session: Session) -> SecretInfo:
            row = self._find(session, owner, ref)
            row.sealed, row.version, row.updated_at = sealed, row.version + 1, time.time()
            if metadata is not None:
                row.secret_metadata = metadata
            return _info(row)

        return await self._db.write(change)

    async def get(self, owner: Owner, ref: str) -> SecretInfo:
        return await self._db.read(lambda session: _info(self._find(session, owner, ref)))

    async def list(self, owner: Owner) -> list[SecretInfo]:
        stmt = select(SecretRow).where(SecretRow.team_id == owner.team_id).order_by(SecretRow.created_at, SecretRow.id)
        return await self._db.read(lambda session: [_info(r) for r in session.scalars(stmt)])

    async def delete(self, owner: Owner, ref: str) -> None:
        await self._db.write(lambda session: session.delete(self._find(session, owner, ref)))

    async def value(self, owner: Owner, name: str) -> str | None:
        """The current value of `owner`'s secret `name` (for the egress proxy only); None if there is none
        or it cannot be opened with this installation's key."""
        row = await self._db.read(lambda session: session.scalar(
            select(SecretRow).where(SecretRow.team_id == owner.team_id, SecretRow.name == name.lower())))
        if row is None:
            return None
        try:
            return self._fernet.decrypt(row.sealed).decode()
        except InvalidToken:
            return None

    @staticmethod
    def _find(session: Session, owner: Owner, ref: str) -> SecretRow:
        matches = SecretRow.id == ref if ref.startswith("sec_") else SecretRow.name == ref.lower()
        row = session.scalar(select(SecretRow).where(SecretRow.team_id == owner.team_id, matches))
        if row is None:
            raise ApiError(404, f"secret {ref} not found")
        return row
