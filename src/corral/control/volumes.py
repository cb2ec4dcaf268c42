"""Volumes (E2B's `/volumes`): named filesystems of a fixed size that outlive sandboxes. An owner (API key)
creates, lists and deletes them; each has a token of its own for the content API, returned on create and
on every read (so it is kept sealed with the installation's secrets key, and as a SHA-256 digest to check
a bearer against); sandboxes mount them by name (`volumeMounts`).

Rules: names are 1-128 of letters, digits, `_` and `-`, unique per owner; a volume mounted by a running
or paused sandbox cannot be deleted (409); mount paths are absolute and stay out of `/`, `/proc`, `/sys`,
`/dev` and `/run/corral` (where sandboxes see the volumes they were given)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import posixpath
import re
import secrets as random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cryptography.fernet import Fernet
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from corral.control.db import Database, SandboxRow, VolumeRow
from corral.control.errors import ApiError
from corral.control.keys import Owner
from corral.runtime.base import VolumeMount
from corral.storage.volume_files import VolumeFiles, VolumePathError
from corral.storage.volumes import VolumeStore

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
# Sandboxes see the volumes they were given under /run/corral/volumes; these cannot be mount points.
RESERVED_PATHS = ("/proc", "/sys", "/dev", "/run/corral")
MAX_MOUNTS = 16
MIN_SIZE_MB = 16


@dataclass(frozen=True)
class VolumeInfo:
    id: str
    name: str
    size_mb: int
    created_at: float


def _info(row: VolumeRow) -> VolumeInfo:
    return VolumeInfo(row.id, row.name, row.size_mb, row.created_at)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_mount_path(path) -> str:
    """The normalized path; ApiError 400 otherwise. (Messages name no absolute path of the user's: the API
    hides absolute paths in messages, control/errors.py.)"""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ApiError(400, f"volume mount path {path!r} must be an absolute path such as /data")
    if "\0" in path or any(part in (".", "..") for part in path.split("/")):
        raise ApiError(400, "volume mount paths must not contain '.' or '..' components")
    normalized = posixpath.normpath(path)
    if normalized == "/":
        raise ApiError(400, "a volume cannot be mounted at /")
    for reserved in RESERVED_PATHS:
        if normalized == reserved or normalized.startswith(reserved + "/"):
            place = "Corral's directory in /run" if reserved.count("/") > 1 else reserved
            raise ApiError(400, f"volume mount paths cannot be inside {place}, which the sandbox's system owns; "
                                "choose another path such as /data")
    return normalized


class Volumes:
    def __init__(self, database: Database, store: VolumeStore, key: bytes, *, default_mb: int,
                 max_mb: int) -> None:
        self._db = database
        self.store = store
        self._fernet = Fernet(key)
        self.default_mb = default_mb
        self.max_mb = max_mb
        # Volumes being mounted into a sandbox that is not recorded yet: not deletable meanwhile.
        self._attaching: Counter[str] = Counter()

    async def open(self) -> None:
        """Mounts every volume (after a reboot) and removes files no volume owns."""
        rows = await self._db.read(lambda session: list(session.scalars(select(VolumeRow))))
        await self.store.open({row.id: row.size_mb for row in rows})

    # --- the control plane -------------------------------------------------------------------------

    async def create(self, owner: Owner, name, size_mb: int | None = None) -> tuple[VolumeInfo, str]:
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(400, f"volume name {name!r} must be 1-128 characters of letters, digits, '_' and '-'")
        size_mb = self.default_mb if size_mb is None else size_mb
        if not MIN_SIZE_MB <= size_mb <= self.max_mb:
            raise ApiError(400, f"volume size {size_mb} MB must be between {MIN_SIZE_MB} and this server's "
                                f"maximum of {self.max_mb} MB")
        token = "vtok_" + random.token_urlsafe(32)
        volume_id = "vol_" + random.token_hex(10)

        def add(session: Session) -> VolumeInfo:
            if session.scalar(select(VolumeRow).where(VolumeRow.team_id == owner.team_id, VolumeRow.name == name)):
                raise ApiError(409, f"a volume named {name!r} exists already")
            row = VolumeRow(id=volume_id, key_id=owner.key_id, team_id=owner.team_id,
                            name=name, size_mb=size_mb, token_digest=_digest(token),
                            token_sealed=self._fernet.encrypt(token.encode()), created_at=time.time())
            session.add(row)
            return _info(row)

        info = await self._db.write(add)
        try:
            await self.store.create(volume_id, size_mb)
        except BaseException:
            await self._db.write(lambda session: session.delete(session.get(VolumeRow, volume_id)))
            raise
        return info, token

    async def get(self, owner: Owner, ref: str) -> tuple[VolumeInfo, str]:
        row = await self._db.read(lambda session: self._find(session, owner, ref))
        return _info(row), self._fernet.decrypt(row.token_sealed).decode()

    async def list(self, owner: Owner) -> list[VolumeInfo]:
        stmt = select(VolumeRow).where(VolumeRow.team_id == owner.team_id).order_by(VolumeRow.created_at, VolumeRow.id)
        return await self._db.read(lambda session: [_info(r) for r in session.scalars(stmt)])

    async def delete(self, owner: Owner, ref: str) -> None:
        def remove(session: Session) -> str:
            row = self._find(session, owner, ref)
            users = sorted(s.id for s in session.scalars(select(SandboxRow).where(
                SandboxRow.team_id == owner.team_id, SandboxRow.volume_mounts.is_not(None)))
                if any(m.get("id") == row.id for m in s.volume_mounts or ()))
            if users or self._attaching[row.id]:
                which = ", ".join(users) or "a sandbox being created"
                raise ApiError(409, f"volume {row.name!r} is mounted by {which}; kill the sandbox first")
            session.delete(row)
            return row.id

        volume_id = await self._db.write(remove)
        await self.store.delete(volume_id)

    @staticmethod
    def _find(session: Session, owner: Owner, ref: str) -> VolumeRow:
        row = session.scalar(select(VolumeRow).where(VolumeRow.team_id == owner.team_id,
                                                     or_(VolumeRow.id == ref, VolumeRow.name == ref)))
        if row is None:
            raise ApiError(404, f"volume {ref} not found")
        return row

    # --- the content plane -------------------------------------------------------------------------

    async def files(self, volume_id: str, authorization: str | None) -> VolumeFiles:
        """The volume's files for a bearer of its token. Any other token, or none, is refused the same way
        (401) whether or not the volume exists, so a token tells nothing about other volumes."""
        scheme, _, token = (authorization or "").partition(" ")
        row = await self._db.read(lambda session: session.get(VolumeRow, volume_id))
        if scheme.lower() != "bearer" or row is None or not hmac.compare_digest(row.token_digest,
                                                                                  _digest(token.strip())):
            raise VolumePathError(401, "unauthorized", f"the token does not grant access to volume {volume_id}")
        if not self.store.mounted(volume_id):
            raise VolumePathError(503, "unavailable", f"volume {volume_id} is not mounted on this server")
        return VolumeFiles(self.store.data(volume_id))

    # --- mounts in sandboxes -----------------------------------------------------------------------

    async def resolve_mounts(self, owner: Owner, requested: list[dict] | None) -> list[dict]:
        """`volumeMounts` of a create: [{"id", "name", "path"}], every name the owner's and every path
        allowed (ApiError 400 otherwise)."""
        if not requested:
            return []
        if len(requested) > MAX_MOUNTS:
            raise ApiError(400, f"at most {MAX_MOUNTS} volume mounts are allowed, got {len(requested)}")
        names = {m["name"] for m in requested}
        rows = await self._db.read(lambda session: {r.name: r for r in session.scalars(
            select(VolumeRow).where(VolumeRow.team_id == owner.team_id, VolumeRow.name.in_(names)))})
        mounts, paths = [], set()
        for mount in requested:
            path = check_mount_path(mount["path"])
            if path in paths:
                raise ApiError(400, "two volumes cannot be mounted at the same path")
            paths.add(path)
            row = rows.get(mount["name"])
            if row is None:
                raise ApiError(400, f"volume {mount['name']!r} does not exist; create it first (Volume.create)")
            mounts.append({"id": row.id, "name": row.name, "path": path})
        return mounts

    async def runtime_mounts(self, mounts: list[dict] | None) -> tuple[VolumeMount, ...]:
        """What the runtime mounts for recorded `mounts`; 409 when one of the volumes was deleted since."""
        if not mounts:
            return ()
        ids = {m["id"] for m in mounts}
        known = await self._db.read(lambda session: set(session.scalars(
            select(VolumeRow.id).where(VolumeRow.id.in_(ids)))))
        for mount in mounts:
            if mount["id"] not in known:
                raise ApiError(409, f"volume {mount['name']!r} was deleted; a sandbox that mounts it cannot start")
        return tuple(VolumeMount(id=m["id"], source=str(self.store.data(m["id"])), path=m["path"])
                     for m in mounts)

    @contextlib.asynccontextmanager
    async def attaching(self, mounts: list[dict] | None) -> AsyncIterator[None]:
        """Around a start that mounts these volumes, until its sandbox is recorded: they are not deleted
        meanwhile."""
        ids = [m["id"] for m in mounts or ()]
        self._attaching.update(ids)
        try:
            yield
        finally:
            self._attaching.subtract(ids)
