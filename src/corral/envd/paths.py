"""Path rules shared by the RPC and HTTP file APIs: home-relative paths and per-user permission checks."""

from __future__ import annotations

import os

from corral.envd.users import User

READ, WRITE, SEARCH = 4, 2, 1


class AccessDenied(PermissionError):
    pass


def resolve(path: str, user: User) -> str:
    """Absolute, normalised path: `~` is the user's home, relative paths start there."""
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    return os.path.normpath(path)


def _check_ancestors(path: str, user: User) -> None:
    """Every existing directory above `path` must be searchable by the user."""
    parent = os.path.dirname(path)
    chain = []
    while True:
        chain.append(parent)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    for directory in reversed(chain):
        try:
            st = os.stat(directory)
        except FileNotFoundError:
            return
        if not user.may(st, SEARCH):
            raise AccessDenied(f"permission denied: {user.name} cannot access '{directory}'")


def check_read(path: str, user: User) -> None:
    if user.is_root:
        return
    _check_ancestors(path, user)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # the caller reports not-found with its own message
    want = READ | SEARCH if os.path.isdir(path) else READ
    if not user.may(st, want):
        raise AccessDenied(f"permission denied: {user.name} cannot read '{path}'")


def check_lookup(path: str, user: User) -> None:
    """Stat-level access: only the directories above need to be searchable."""
    if not user.is_root:
        _check_ancestors(path, user)


def check_write(path: str, user: User) -> None:
    """The user may create or replace `path`: an existing non-directory target is writable by them, and
    so is its directory if that exists. A missing directory is no obstacle: `make_parents` creates it for
    the user, wherever it is (as E2B's envd does; the user has passwordless sudo in our templates)."""
    if user.is_root:
        return
    _check_ancestors(path, user)
    if os.path.lexists(path) and not os.path.isdir(path) and not user.may(os.stat(path), WRITE):
        raise AccessDenied(f"permission denied: {user.name} cannot write '{path}'")
    parent = os.path.dirname(path)
    if os.path.isdir(parent) and not user.may(os.stat(parent), WRITE | SEARCH):
        raise AccessDenied(f"permission denied: {user.name} cannot write in '{parent}'")


def check_remove(path: str, user: User) -> None:
    if user.is_root:
        return
    _check_ancestors(path, user)
    parent = os.path.dirname(path)
    if not user.may(os.stat(parent), WRITE | SEARCH):
        raise AccessDenied(f"permission denied: {user.name} cannot write in '{parent}'")


def make_parents(directory: str, user: User) -> None:
    """mkdir -p on the user's behalf (also where they could not create it themselves), with every
    directory it creates owned by the user and mode 0755."""
    missing = []
    while not os.path.exists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        os.mkdir(path, 0o755)
        os.chown(path, user.uid, user.gid)
