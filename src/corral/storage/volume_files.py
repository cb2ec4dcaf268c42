"""The files of one volume as the volume content API sees them (`/volumecontent/{id}/...`): stat, read,
write, make a directory, list, change owner and mode, remove, all confined to the volume's directory.

Confinement: every path is resolved by the kernel with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_XDEV |
RESOLVE_NO_MAGICLINKS) against a descriptor of the volume's root. `..`, absolute symlinks and symlinks
whose target climbs out are all resolved as if the volume's root were `/`, and no path crosses into
another mount, so nothing a client or a sandbox writes into a volume (sandboxes can make any symlink)
leads to a host file outside it. The last component is worked on through its parent's descriptor with
the *at calls and without following it (a symlink is listed, removed or replaced as itself).

Nothing here knows HTTP; errors are `VolumePathError` with the status and the string code the API answers
with."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import os
import posixpath
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
MAX_LIST_DEPTH = 32
_CHUNK = 1 << 20

# openat2(2): not in the os module; the syscall number is the same on every architecture.
_SYS_OPENAT2 = 437
_RESOLVE_NO_XDEV, _RESOLVE_NO_MAGICLINKS, _RESOLVE_IN_ROOT = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class VolumePathError(Exception):
    """What the content API answers: `status`, a string `code` and a message the user can act on."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _not_found(path: str) -> VolumePathError:
    return VolumePathError(404, "not_found", f"path {path} does not exist in the volume")


@dataclass(frozen=True)
class EntryStat:
    name: str
    type: str  # file | directory | symlink | unknown
    path: str
    size: int
    mode: int
    uid: int
    gid: int
    atime: float
    mtime: float
    ctime: float
    target: str | None = None

    def to_json(self) -> dict:
        answer = {"name": self.name, "type": self.type, "path": self.path, "size": self.size, "mode": self.mode,
                  "uid": self.uid, "gid": self.gid, "atime": _iso(self.atime), "mtime": _iso(self.mtime),
                  "ctime": _iso(self.ctime)}
        if self.target is not None:
            answer["target"] = self.target
        return answer


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "unknown"


def normalize(path: str) -> str:
    """The path inside the volume, absolute and without `.`/`..` (lexically clamped at the root; the kernel
    clamps what symlinks add the same way)."""
    if not isinstance(path, str) or "\0" in path:
        raise VolumePathError(400, "bad_request", "path must be a string without NUL characters")
    return posixpath.normpath("/" + path).replace("//", "/")


class VolumeFiles:
    """The files under `root` (a volume's mounted filesystem)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # --- resolution ----------------------------------------------------------------------------------

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        """openat2 of `path` under the root, as if the root were `/`."""
        root = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode,
                           resolve=_RESOLVE_IN_ROOT | _RESOLVE_NO_XDEV | _RESOLVE_NO_MAGICLINKS)
            relative = path.lstrip("/") or "."
            fd = _libc.syscall(_SYS_OPENAT2, root, relative.encode(), ctypes.byref(how), ctypes.sizeof(how))
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
            return fd
        finally:
            os.close(root)

    @contextlib.contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the parent directory, last component) of a normalized path other than `/`."""
        parent, name = posixpath.split(path)
        try:
            fd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise VolumePathError(404, "not_found", f"parent directory of {path} does not exist") from None
            raise _translate(e, path) from None
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _stat_of(self, path: str, st: os.stat_result, target: str | None) -> EntryStat:
        return EntryStat(name=posixpath.basename(path) or "/", type=_kind(st.st_mode), path=path,
                         size=st.st_size, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                         atime=st.st_atime, mtime=st.st_mtime, ctime=st.st_ctime, target=target)

    def _entry(self, parent_fd: int, name: str, path: str) -> EntryStat:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        target = os.readlink(name, dir_fd=parent_fd) if stat.S_ISLNK(st.st_mode) else None
        return self._stat_of(path, st, target)

    # --- operations ----------------------------------------------------------------------------------

    def stat(self, path: str) -> EntryStat:
        path = normalize(path)
        if path == "/":
            fd = self._open("/", os.O_PATH | os.O_DIRECTORY)
            try:
                return self._stat_of("/", os.fstat(fd), None)
            finally:
                os.close(fd)
        with self._parent(path) as (parent, name):
            try:
                return self._entry(parent, name, path)
            except FileNotFoundError:
                raise _not_found(path) from None

    def open_for_reading(self, path: str) -> int:
        """A descriptor of the file (symlinks followed within the volume); the caller closes it."""
        path = normalize(path)
        try:
            fd = self._open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            raise _translate(e, path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise VolumePathError(400, "not_a_file", f"{path} is not a regular file")
        return fd

    def read_chunks(self, fd: int) -> Iterator[bytes]:
        try:
            while chunk := os.read(fd, _CHUNK):
                yield chunk
        finally:
            os.close(fd)

    def begin_write(self, path: str, *, force: bool) -> tuple[str, int, int, str]:
        """Checks a write may happen and opens a new hidden file beside the target to write into:
        (normalized path, parent descriptor, file descriptor, its temporary name). `commit_write` puts it
        in place, `abort_write` removes it."""
        path = normalize(path)
        if path == "/":
            raise VolumePathError(400, "bad_request", "/ is the volume's root directory, not a file")
        with self._parent(path) as (parent, name):
            try:
                existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise VolumePathError(409, "conflict", f"{path} is a directory")
            if existing is not None and not force:
                raise VolumePathError(409, "conflict", f"{path} exists already; write with force=true to "
                                                       "replace it")
            keep = os.dup(parent)
        temporary = f".{name[:200]}.corral-{secrets.token_hex(6)}"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=keep)
        except OSError as e:
            os.close(keep)
            raise _translate(e, path) from None
        return path, keep, fd, temporary

    def write_chunk(self, fd: int, data: bytes, path: str) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            raise _translate(e, path) from None

    def commit_write(self, path: str, parent: int, fd: int, temporary: str, *, uid: int | None,
                     gid: int | None, mode: int | None) -> EntryStat:
        try:
            owner = os.fstat(parent)
            os.fchown(fd, owner.st_uid if uid is None else uid, owner.st_gid if gid is None else gid)
            os.fchmod(fd, DEFAULT_FILE_MODE if mode is None else mode)
            os.close(fd)
            fd = -1
            name = posixpath.basename(path)
            os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
            return self._entry(parent, name, path)
        except OSError as e:
            self.abort_write(parent, fd, temporary)
            raise _translate(e, path) from None
        finally:
            with contextlib.suppress(OSError):
                os.close(parent)

    def abort_write(self, parent: int, fd: int, temporary: str) -> None:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=parent)

    def make_dir(self, path: str, *, uid: int | None, gid: int | None, mode: int | None,
                 force: bool) -> EntryStat:
        path = normalize(path)
        if path == "/":
            if force:
                return self.stat("/")
            raise VolumePathError(409, "conflict", "/ exists already")
        if force:
            self._make_parents(posixpath.dirname(path), uid, gid, mode)
        with self._parent(path) as (parent, name):
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                existing = self._entry(parent, name, path)
                if force and existing.type == "directory":
                    return existing
                raise VolumePathError(409, "conflict", f"{path} exists already") from None
            except OSError as e:
                raise _translate(e, path) from None
            self._own(parent, name, uid, gid, DEFAULT_DIR_MODE if mode is None else mode)
            return self._entry(parent, name, path)

    def _make_parents(self, path: str, uid: int | None, gid: int | None, mode: int | None) -> None:
        current = "/"
        for part in [p for p in path.split("/") if p]:
            current = posixpath.join(current, part)
            with self._parent(current) as (parent, name):
                try:
                    os.mkdir(name, 0o700, dir_fd=parent)
                except FileExistsError:
                    continue
                except OSError as e:
                    raise _translate(e, current) from None
                self._own(parent, name, uid, gid, DEFAULT_DIR_MODE if mode is None else mode)

    def _own(self, parent: int, name: str, uid: int | None, gid: int | None, mode: int) -> None:
        """New entries belong to the owner of the directory they are made in unless uid/gid say otherwise."""
        owner = os.fstat(parent)
        os.chown(name, owner.st_uid if uid is None else uid, owner.st_gid if gid is None else gid,
                 dir_fd=parent, follow_symlinks=False)
        os.chmod(name, mode, dir_fd=parent)

    def list(self, path: str, depth: int = 1) -> list[EntryStat]:
        path = normalize(path)
        if not 1 <= depth <= MAX_LIST_DEPTH:
            raise VolumePathError(400, "bad_request", f"depth must be between 1 and {MAX_LIST_DEPTH}")
        try:
            fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise VolumePathError(400, "not_a_directory", f"{path} is not a directory") from None
            raise _translate(e, path) from None
        entries: list[EntryStat] = []
        try:
            self._walk(fd, path, depth, entries)
        finally:
            os.close(fd)
        return entries

    def _walk(self, fd: int, path: str, depth: int, into: list[EntryStat]) -> None:
        for name in sorted(os.listdir(fd)):
            child = posixpath.join(path, name)
            try:
                entry = self._entry(fd, name, child)
            except FileNotFoundError:
                continue  # removed while we listed
            into.append(entry)
            if depth > 1 and entry.type == "directory":
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError:
                    continue
                try:
                    self._walk(sub, child, depth - 1, into)
                finally:
                    os.close(sub)

    def update(self, path: str, *, uid: int | None, gid: int | None, mode: int | None) -> EntryStat:
        path = normalize(path)
        if path == "/":
            raise VolumePathError(400, "bad_request", "the owner and mode of the volume's root cannot be changed")
        with self._parent(path) as (parent, name):
            try:
                current = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if uid is not None or gid is not None:
                    os.chown(name, current.st_uid if uid is None else uid, current.st_gid if gid is None else gid,
                             dir_fd=parent, follow_symlinks=False)
                if mode is not None and not stat.S_ISLNK(current.st_mode):  # a symlink has no mode of its own
                    os.chmod(name, mode, dir_fd=parent)
                return self._entry(parent, name, path)
            except OSError as e:
                raise _translate(e, path) from None

    def remove(self, path: str) -> None:
        path = normalize(path)
        if path == "/":
            raise VolumePathError(404, "not_found", "/ is the volume's root and cannot be removed")
        with self._parent(path) as (parent, name):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=parent)  # descriptor-based: never follows a symlink out
                else:
                    os.unlink(name, dir_fd=parent)
            except OSError as e:
                raise _translate(e, path) from None

    def usage(self) -> tuple[int, int]:
        """(used, total) bytes of the volume's filesystem."""
        st = os.statvfs(self.root)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize


def _translate(error: OSError, path: str) -> VolumePathError:
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return _not_found(path)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return VolumePathError(507, "volume_full", "the volume is full: remove files or use a larger volume "
                                                   "(its size is set when it is created)")
    if error.errno == errno.EXDEV:
        return VolumePathError(400, "bad_request", f"{path} leads out of the volume")
    if error.errno == errno.ELOOP:
        return VolumePathError(400, "bad_request", f"{path} has too many levels of symbolic links")
    if error.errno == errno.EEXIST:
        return VolumePathError(409, "conflict", f"{path} exists already")
    if error.errno == errno.EISDIR:
        return VolumePathError(409, "conflict", f"{path} is a directory")
    if error.errno in (errno.EPERM, errno.EACCES, errno.EINVAL):
        return VolumePathError(400, "bad_request", f"{path}: {os.strerror(error.errno)}")
    return VolumePathError(500, "internal", f"{path}: {os.strerror(error.errno or 0)}")
