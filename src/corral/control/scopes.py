"""What an API key may do: its scopes, and the one table that says which scope every route needs.

Every route that takes an API key is in `ROUTE_SCOPES` (method, path template as FastAPI declares it); the
authentication dependency refuses a route missing from it (fail closed), and tests/test_fast_scopes.py
checks the table against the application's routes, so a new route without a scope cannot ship.

`read` is implied by every scope: any key of a team may list and look at what its team has. `admin`
implies them all."""

from __future__ import annotations

READ = "read"
SANDBOXES = "sandboxes"  # create, kill, pause, resume, fork, snapshot, time out, network rules of sandboxes
EXECUTE = "execute"  # run commands and code, files (envd): the create and connect answers carry the envd token
TEMPLATES = "templates"  # build, tag and delete templates
SECRETS = "secrets"  # create, change and delete secrets
VOLUMES = "volumes"  # create and delete volumes, and reach their content
ADMIN = "admin"  # everything, also the team's usage, caps, events and webhooks

ALL = (READ, SANDBOXES, EXECUTE, TEMPLATES, SECRETS, VOLUMES, ADMIN)
# What a key gets when none are named (and what keys made before scopes have): all but admin.
DEFAULT = (READ, SANDBOXES, EXECUTE, TEMPLATES, SECRETS, VOLUMES)

DESCRIPTIONS = {
    READ: "list and look at the team's sandboxes, templates, volumes, secrets (names), snapshots, logs, metrics",
    SANDBOXES: "create, kill, pause, resume, fork and snapshot sandboxes; change their timeout and network",
    EXECUTE: "run commands and code and use files inside sandboxes (the envd access token); record the screen",
    TEMPLATES: "build, tag and delete templates",
    SECRETS: "create, change and delete secrets",
    VOLUMES: "create and delete volumes and reach their content",
    ADMIN: "everything above",
}


class UnknownScope(ValueError):
    pass


def normalize(scopes: list[str] | tuple[str, ...] | None) -> frozenset[str]:
    """The scopes a key holds, from what was asked for (None: the default); unknown names are refused."""
    names = [s.strip().lower() for s in (DEFAULT if scopes is None else scopes) if s.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise UnknownScope(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    if not names:
        raise UnknownScope(f"a key needs at least one scope; known: {', '.join(ALL)}")
    return frozenset(names) | {READ}


def allows(held: frozenset[str], needed: str) -> bool:
    return needed in held or ADMIN in held


_S, _X, _T, _SEC, _V, _R = SANDBOXES, EXECUTE, TEMPLATES, SECRETS, VOLUMES, READ

ROUTE_SCOPES: dict[tuple[str, str], str] = {
    # sandboxes
    ("POST", "/sandboxes"): _S,
    ("POST", "/v2/sandboxes"): _S,
    ("GET", "/sandboxes"): _R,
    ("GET", "/v2/sandboxes"): _R,
    ("GET", "/sandboxes/{sandbox_id}"): _R,
    ("DELETE", "/sandboxes/{sandbox_id}"): _S,
    ("POST", "/sandboxes/{sandbox_id}/timeout"): _S,
    ("POST", "/sandboxes/{sandbox_id}/connect"): _S,
    ("POST", "/v2/sandboxes/{sandbox_id}/connect"): _S,
    ("POST", "/sandboxes/{sandbox_id}/resume"): _S,
    ("PUT", "/sandboxes/{sandbox_id}/network"): _S,
    ("GET", "/sandboxes/{sandbox_id}/metrics"): _R,
    ("GET", "/sandboxes/{sandbox_id}/logs"): _R,
    ("GET", "/v2/sandboxes/{sandbox_id}/logs"): _R,
    # pause, snapshots, forks and the checkpoint tree
    ("POST", "/sandboxes/{sandbox_id}/pause"): _S,
    ("POST", "/sandboxes/{sandbox_id}/snapshots"): _S,
    ("POST", "/sandboxes/{sandbox_id}/fork"): _S,
    ("GET", "/snapshots"): _R,
    ("DELETE", "/templates/{snapshot_id}"): _T,  # a snapshot or a template (E2B deletes both here)
    ("GET", "/checkpoints"): _R,
    ("GET", "/checkpoints/{ref}"): _R,
    ("GET", "/checkpoints/{ref}/tree"): _R,
    ("PATCH", "/checkpoints/{ref}"): _S,
    ("DELETE", "/checkpoints/{ref}"): _S,
    ("POST", "/checkpoints/{ref}/sandboxes"): _S,
    # recordings of desktops
    ("POST", "/sandboxes/{sandbox_id}/recordings"): _X,
    ("GET", "/sandboxes/{sandbox_id}/recordings"): _R,
    ("GET", "/recordings"): _R,
    ("GET", "/recordings/{recording_id}"): _R,
    ("GET", "/recordings/{recording_id}/file"): _R,
    ("POST", "/recordings/{recording_id}/stop"): _X,
    ("PATCH", "/recordings/{recording_id}"): _X,
    ("DELETE", "/recordings/{recording_id}"): _X,
    # secrets
    ("POST", "/secrets"): _SEC,
    ("GET", "/secrets"): _R,
    ("GET", "/secrets/{secret}"): _R,
    ("POST", "/secrets/{secret}"): _SEC,
    ("DELETE", "/secrets/{secret}"): _SEC,
    # templates
    ("POST", "/v3/templates"): _T,
    ("POST", "/templates"): _T,
    ("GET", "/templates"): _R,
    ("GET", "/templates/{template_id}/files/{files_hash}"): _T,
    ("POST", "/v2/templates/{template_id}/builds/{build_id}"): _T,
    ("GET", "/templates/{template_id}/builds/{build_id}/status"): _R,
    ("GET", "/templates/aliases/{alias}"): _R,
    ("POST", "/templates/tags"): _T,
    ("DELETE", "/templates/tags"): _T,
    ("GET", "/templates/{ref}/tags"): _R,
    # usage and spending
    ("GET", "/usage"): _R,
    ("GET", "/usage/spending"): _R,
    ("GET", "/sandboxes/{sandbox_id}/usage"): _R,
    # volumes (their content is reached with each volume's own token, not a key)
    ("POST", "/volumes"): _V,
    ("GET", "/volumes"): _R,
    ("GET", "/volumes/{volume}"): _V,  # the answer carries the volume's token, which opens its content
    ("DELETE", "/volumes/{volume}"): _V,
    # events and webhooks (webhooks send the team's events elsewhere: only admin keys change them)
    ("GET", "/events"): _R,
    ("GET", "/events/sandboxes"): _R,
    ("GET", "/events/sandboxes/{sandbox_id}"): _R,
    ("POST", "/events/webhooks"): ADMIN,
    ("GET", "/events/webhooks"): _R,
    ("GET", "/events/webhooks/{webhook_id}"): _R,
    ("PATCH", "/events/webhooks/{webhook_id}"): ADMIN,
    ("DELETE", "/events/webhooks/{webhook_id}"): ADMIN,
    ("GET", "/events/webhooks/{webhook_id}/deliveries"): _R,
    ("POST", "/events/webhooks/{webhook_id}/test"): ADMIN,
}
