"""EntryInfo for a path, with the fields and formats the E2B SDKs expect."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from corral.envd.proto import filesystem_pb as fs
from corral.envd.users import group_name, owner_name

METADATA_PREFIX = "user.e2b."

# Go's os.FileMode.String() letters, in bit order; E2B reports permissions in that notation.
_GO_TYPE_LETTERS = (
    (stat.S_ISDIR, "d"),
    (stat.S_ISLNK, "L"),
    (stat.S_ISBLK, "D"),
    (stat.S_ISFIFO, "p"),
    (stat.S_ISSOCK, "S"),
)


def go_mode_string(mode: int) -> str:
    letters = "".join(letter for test, letter in _GO_TYPE_LETTERS if test(mode))
    if stat.S_ISCHR(mode):
        letters += "Dc"
    if mode & stat.S_ISUID:
        letters += "u"
    if mode & stat.S_ISGID:
        letters += "g"
    if mode & stat.S_ISVTX:
        letters += "t"
    rwx = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return (letters or "-") + rwx


class _SidecarMetadata:
    """Metadata for files whose filesystem refuses user xattrs (gVisor's gofer before 2026 does), kept
    in one JSON file keyed by inode so it follows renames. An inode reused after a delete that envd did
    not see may show the old file's metadata; xattrs are used wherever the filesystem has them."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._entries: dict[str, dict[str, str]] | None = None

    def _load(self) -> dict[str, dict[str, str]]:
        if self._entries is None:
            try:
                with open(self._path) as f:
                    self._entries = json.load(f)
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    @staticmethod
    def _key(st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}"

    def get(self, st: os.stat_result) -> dict[str, str]:
        return dict(self._load().get(self._key(st), {}))

    def put(self, st: os.stat_result, metadata: dict[str, str]) -> None:
        entries = self._load()
        if metadata:
            entries[self._key(st)] = dict(metadata)
        elif entries.pop(self._key(st), None) is None:
            return  # nothing was kept for it: no rewrite
        os.makedirs(os.path.dirname(self._path), mode=0o700, exist_ok=True)
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, self._path)

    def forget(self, st: os.stat_result) -> None:
        self.put(st, {})


SIDECAR = _SidecarMetadata(os.environ.get("ENVD_METADATA_FILE", "/var/lib/envd/metadata.json"))


def _unsupported(e: OSError) -> bool:
    return e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)


def read_metadata(path: str) -> dict[str, str]:
    metadata = {}
    try:
        names = os.listxattr(path)
    except OSError as e:
        names = []
        if not _unsupported(e):
            return {}
    for name in names:
        if name.startswith(METADATA_PREFIX):
            with contextlib.suppress(OSError):
                metadata[name[len(METADATA_PREFIX):]] = os.getxattr(path, name).decode(errors="replace")
    if not metadata:
        with contextlib.suppress(OSError):
            return SIDECAR.get(os.stat(path))
    return metadata


def write_metadata(path: str, metadata: dict[str, str]) -> None:
    """Replace the path's metadata with `metadata`; an empty one clears it."""
    try:
        # gVisor's gofer lists no xattrs (an empty list, not ENOTSUP); only setting one fails.
        for name in os.listxattr(path):
            if name.startswith(METADATA_PREFIX):
                os.removexattr(path, name)
        for key, value in metadata.items():
            os.setxattr(path, METADATA_PREFIX + key, value.encode())
    except OSError as e:
        if not _unsupported(e):
            raise
        SIDECAR.put(os.stat(path), metadata)
        return
    SIDECAR.forget(os.stat(path))  # whatever the sidecar held for this inode is replaced too


def file_type(mode: int) -> fs.FileType:
    if stat.S_ISDIR(mode):
        return fs.FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return fs.FileType.SYMLINK
    return fs.FileType.FILE


def entry_info(path: str, name: str | None = None) -> fs.EntryInfo:
    """Raises FileNotFoundError when `path` does not exist (a dangling symlink exists)."""
    lst = os.lstat(path)
    is_symlink = stat.S_ISLNK(lst.st_mode)
    st, target = lst, None
    if is_symlink:
        target = os.path.realpath(path)
        try:
            st = os.stat(path)
        except OSError:
            st = lst  # dangling: describe the link itself
    ns = st.st_mtime_ns
    return fs.EntryInfo(
        name=name if name is not None else (os.path.basename(path) or "/"),
        type=file_type(st.st_mode),
        path=path,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode) & 0o777,
        permissions=go_mode_string(st.st_mode),
        owner=owner_name(st.st_uid),
        group=group_name(st.st_gid),
        modified_time=Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000),
        symlink_target=target,
        metadata=read_metadata(path) if not is_symlink or st is not lst else {},
        is_symlink=is_symlink,
    )
