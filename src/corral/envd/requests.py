"""Who an RPC acts as: the Basic-auth user name, else the sandbox's default user."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from corral.envd.state import SandboxState
from corral.envd.users import UnknownUser, User, from_basic_auth, lookup


def resolve_user(name: str | None, state: SandboxState) -> User:
    """Raises UnknownUser."""
    return lookup(name or state.default_user)


def request_user(authorization: str | None, state: SandboxState) -> User:
    try:
        return resolve_user(from_basic_auth(authorization), state)
    except UnknownUser:
        raise ConnectError(Code.UNAUTHENTICATED, "invalid username") from None
