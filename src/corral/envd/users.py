"""Sandbox users: who a request acts as, and what that user may touch."""

from __future__ import annotations

import base64
import grp
import os
import pwd
import stat
from dataclasses import dataclass


class UnknownUser(LookupError):
    pass


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def may(self, st: os.stat_result, want: int) -> bool:
        """POSIX permission check of `want` (bits of 4=read, 2=write, 1=execute/search) on `st`."""
        if self.is_root:
            return True
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want


# Every request names a user, and a lookup through NSS reads /etc/passwd and /etc/group: ~1.5 ms under
# gVisor. Answers are kept while those files are unchanged (useradd, groupadd or usermod in a command
# replaces them, which changes their mtime or inode, so a new user is found on its next request).
_ACCOUNT_FILES = ("/etc/passwd", "/etc/group")


class _AccountCache:
    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.stamp: tuple | None = None

    def fresh(self) -> dict[str, User]:
        stamp = tuple(_file_stamp(path) for path in _ACCOUNT_FILES)
        if stamp != self.stamp:
            self.users.clear()
            self.stamp = stamp
        return self.users


def _file_stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


_accounts = _AccountCache()


def lookup(name: str) -> User:
    users = _accounts.fresh()
    user = users.get(name)
    if user is None:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UnknownUser(name) from None  # not kept: the next command may create the user
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        user = users[name] = User(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups,
                                  home=entry.pw_dir or "/")
    return user


def from_basic_auth(header: str | None) -> str | None:
    """The user name from `Authorization: Basic base64("<user>:")`, or None when absent."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise UnknownUser("malformed basic auth") from None
    return decoded.partition(":")[0] or None


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)
