"""GET/POST /files: downloads and uploads over plain HTTP, with users, gzip, metadata and signed URLs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import mimetypes
import os
import re
import time
import zlib
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from corral.envd import paths
from corral.envd.entry import write_metadata
from corral.envd.requests import resolve_user
from corral.envd.state import SandboxState
from corral.envd.users import UnknownUser, User

READ_CHUNK = 256 * 1024
MAX_UPLOAD_FILES = 10_000
# A multipart part without a filename (a browser's FormData given a string) is held in memory, not spooled
# to disk like a file part; this bounds it.
MAX_FIELD_BYTES = 64 * 1024 * 1024
_METADATA_HEADER = "x-metadata-"
_METADATA_KEY = re.compile(r"^[a-z0-9_.\-]{1,128}$")
UNAUTHORIZED = "unauthorized access, please provide a valid access token or method signing if supported"


class FileError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.status, "message": self.message}, status_code=self.status)


def signature_for(path: str, operation: str, username: str, token: str, expiration: int | None) -> str:
    raw = f"{path}:{operation}:{username}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def authorize(request: Request, state: SandboxState, operation: str) -> None:
    """A matching X-Access-Token, or a valid signature for this path, operation and user."""
    if state.access_token is None:
        return
    if request.headers.get("x-access-token") is not None:
        if state.token_matches(request.headers["x-access-token"]):
            return
        raise FileError(401, UNAUTHORIZED)
    query = request.query_params
    signature = query.get("signature")
    if not signature:
        raise FileError(401, UNAUTHORIZED)
    expiration = None
    if raw := query.get("signature_expiration"):
        try:
            expiration = int(raw)
        except ValueError:
            raise FileError(400, "signature_expiration must be a unix timestamp") from None
        if expiration < time.time():
            raise FileError(401, "signature is already expired")
    expected = signature_for(query.get("path", ""), operation, query.get("username", ""),
                             state.access_token, expiration)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise FileError(401, "invalid signature")


def _user_and_path(request: Request, state: SandboxState, *, path: str | None = None) -> tuple[User, str]:
    try:
        user = resolve_user(request.query_params.get("username"), state)
    except UnknownUser:
        raise FileError(401, "invalid username") from None
    raw = path if path is not None else request.query_params.get("path")
    if not raw:
        raise FileError(400, "path is required")
    if "\x00" in raw:
        raise FileError(400, "path must not contain NUL bytes")
    return user, paths.resolve(raw, user)


async def download(request: Request, state: SandboxState) -> Response:
    try:
        authorize(request, state, "read")
        user, path = _user_and_path(request, state)
        try:
            paths.check_read(path, user)
        except paths.AccessDenied as e:
            raise FileError(403, str(e)) from None
        if os.path.isdir(path):
            raise FileError(400, f"path '{path}' is a directory")
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the streaming body
        except FileNotFoundError:
            raise FileError(404, f"path '{path}' does not exist") from None
        except OSError as e:
            raise FileError(400, f"cannot read '{path}': {e.strerror}") from None
    except FileError as e:
        return e.response()
    name = os.path.basename(path)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {"Content-Disposition": _inline_disposition(name)}
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return StreamingResponse(_gzip_chunks(handle), media_type=media_type, headers=headers)
    headers["Content-Length"] = str(os.fstat(handle.fileno()).st_size)
    return StreamingResponse(_chunks(handle), media_type=media_type, headers=headers)


def _inline_disposition(name: str) -> str:
    from urllib.parse import quote

    if name.isascii() and '"' not in name:
        return f'inline; filename="{name}"'
    return f"inline; filename*=utf-8''{quote(name)}"


async def _chunks(handle) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, READ_CHUNK):
            yield chunk
    finally:
        handle.close()


async def _gzip_chunks(handle) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    async for chunk in _chunks(handle):
        if out := compressor.compress(chunk):
            yield out
    yield compressor.flush()


def _metadata(request: Request) -> dict[str, str] | None:
    found = {}
    for key, value in request.headers.items():
        if key.lower().startswith(_METADATA_HEADER):
            name = key[len(_METADATA_HEADER):].lower()
            if not _METADATA_KEY.match(name):
                raise FileError(400, f"invalid metadata key '{name}'")
            if not value.isprintable() or not value.isascii():
                raise FileError(400, f"invalid metadata value for '{name}'")
            found[name] = value
    return found or None


class _Target:
    """A file being written for a user: parents created, truncated, owned by the user."""

    def __init__(self, path: str, user: User) -> None:
        if os.path.isdir(path):
            raise FileError(400, f"path '{path}' is a directory")
        try:
            paths.check_write(path, user)
            paths.make_parents(os.path.dirname(path), user)
        except paths.AccessDenied as e:
            raise FileError(403, str(e)) from None
        except NotADirectoryError:
            raise FileError(400, f"a parent of '{path}' is not a directory") from None
        except OSError as e:
            raise _os_error(e, path) from None
        self.path = path
        self.created = not os.path.lexists(path)
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            if self.created:
                os.fchown(self.fd, user.uid, user.gid)
        except OSError as e:
            raise _os_error(e, path) from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def finish(self) -> None:
        os.close(self.fd)

    def abandon(self) -> None:
        os.close(self.fd)
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _os_error(e: OSError, path: str) -> FileError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileError(507, "not enough disk space available")
    if e.errno in (errno.EACCES, errno.EPERM):
        return FileError(403, f"permission denied: '{path}'")
    return FileError(500, f"cannot write '{path}': {e.strerror}")


def _written(path: str, metadata: dict[str, str] | None) -> dict:
    """The upload's answer for one file. The file's metadata becomes what this upload sent: writing a
    file again without metadata clears what an earlier upload (or anyone) set."""
    info = {"name": os.path.basename(path), "type": "file", "path": path}
    write_metadata(path, metadata or {})
    if metadata:
        info["metadata"] = metadata
    return info


async def upload(request: Request, state: SandboxState) -> Response:
    try:
        authorize(request, state, "write")
        metadata = _metadata(request)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            written = await _upload_multipart(request, state, metadata)
        elif content_type.startswith("application/octet-stream") or not content_type:
            written = [await _upload_raw(request, state, metadata)]
        else:
            raise FileError(400, f"unsupported content type '{content_type}'; "
                                 "use multipart/form-data or application/octet-stream")
    except FileError as e:
        return e.response()
    return JSONResponse(written)


async def _upload_raw(request: Request, state: SandboxState, metadata) -> dict:
    user, path = _user_and_path(request, state)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip"):
        raise FileError(400, f"unsupported content encoding '{encoding}'")
    inflater = zlib.decompressobj(47) if encoding == "gzip" else None
    target = _Target(path, user)
    try:
        async for received in request.stream():
            target.write(inflater.decompress(received) if inflater is not None else received)
        if inflater is not None:
            target.write(inflater.flush())
            if not inflater.eof:
                raise FileError(400, "truncated gzip body")
    except zlib.error as e:
        target.abandon()
        raise FileError(400, f"invalid gzip body: {e}") from None
    except OSError as e:
        target.abandon()
        raise _os_error(e, path) from None
    except BaseException:
        target.abandon()
        raise
    target.finish()
    return _written(path, metadata)


async def _upload_multipart(request: Request, state: SandboxState, metadata) -> list[dict]:
    try:
        form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=MAX_UPLOAD_FILES,
                                  max_part_size=MAX_FIELD_BYTES)
    except Exception as e:
        raise FileError(400, f"invalid multipart body: {e}") from None
    try:
        # File parts under any field name, and a plain `file` field: what a browser's FormData sends for
        # `form.append("file", "some text")` (no filename; the path comes from the query).
        parts = [part for key, part in form.multi_items() if isinstance(part, UploadFile) or key == "file"]
        if not parts:
            raise FileError(400, "no file in the multipart body (expected field 'file')")
        only_path = request.query_params.get("path") if len(parts) == 1 else None
        written = []
        for part in parts:
            name = only_path or (part.filename if isinstance(part, UploadFile) else None)
            if not name:
                raise FileError(400, "a file part has no filename and no path was given")
            user, path = _user_and_path(request, state, path=name)
            target = _Target(path, user)
            try:
                if isinstance(part, UploadFile):
                    while chunk := await part.read(READ_CHUNK):
                        target.write(chunk)
                else:
                    target.write(part.encode())
            except OSError as e:
                target.abandon()
                raise _os_error(e, path) from None
            target.finish()
            written.append(_written(path, metadata))
        return written
    finally:
        await form.close()
