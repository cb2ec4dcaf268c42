"""EntryInfo for a path, with the fields and formats the E2B SDKs expect."""

from __future__ import annotations

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


def read_metadata(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata = {}
    for name in names:
        if name.startswith(METADATA_PREFIX):
            try:
                metadata[name[len(METADATA_PREFIX):]] = os.getxattr(path, name).decode(errors="replace")
            except OSError:
                continue
    return metadata


def write_metadata(path: str, metadata: dict[str, str]) -> None:
    """Replace the path's metadata with `metadata`."""
    for name in os.listxattr(path):
        if name.startswith(METADATA_PREFIX):
            os.removexattr(path, name)
    for key, value in metadata.items():
        os.setxattr(path, METADATA_PREFIX + key, value.encode())


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
