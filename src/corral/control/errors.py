"""One family of errors for the control plane, and one mapping from any exception to the HTTP status and
message a client sees (`to_http`): the API's error handlers and the per-sandbox results of a fork both
answer through it.

A message never carries the server's own file paths: a runtime error such as `[Errno 2] No such file or
directory: '/var/lib/corral/sandboxes/…/runsc.log'` says where this host keeps its state and is of no use
to a client. `HostPaths` replaces each path with what it is; the server's log keeps the full message."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from corral.config import Settings
from corral.orchestrator.envd_link import EnvdUnavailable
from corral.runtime.base import RuntimeError_


class ApiError(Exception):
    """An answer meant for the client: its HTTP status and message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}  # e.g. Retry-After on a 429


def not_found(sandbox_id: str) -> ApiError:
    return ApiError(404, f"sandbox {sandbox_id} not found")


# What ends a path inside a message: whitespace, quotes, brackets and list punctuation.
_STOP = r"\s'\"(),;\[\]"
# Any other absolute path of two components or more (`/init` alone is an endpoint, not a place). Not
# after a word character, `.`, `~`, `:` or `/`, so relative paths and URLs stay as they are.
_ANY_PATH = re.compile(rf"(?<![\w.~:/-])(?:/[^{_STOP}/:]+){{2,}}/?")
ELSEWHERE = "a path on the server"


class HostPaths:
    """Replaces this server's paths in a message with a description: paths under the given directories
    with that directory's description, any other absolute path with `ELSEWHERE`."""

    def __init__(self, places: Mapping[Path, str] | None = None) -> None:
        # Longest first, so a directory inside another is described as itself.
        roots = sorted((places or {}).items(), key=lambda item: len(str(item[0])), reverse=True)
        self._places = [(re.compile(re.escape(str(root).rstrip("/")) + rf"(?=[/{_STOP}]|$)[^{_STOP}]*"),
                         description) for root, description in roots]

    @classmethod
    def of(cls, settings: Settings) -> HostPaths:
        return cls({settings.data_dir: "a file in the server's data directory",
                    settings.cache_dir: "a file in the server's template cache",
                    settings.run_dir: "a file in the server's run directory"})

    def hide(self, text: str) -> str:
        for pattern, description in self._places:
            text = pattern.sub(description, text)
        return _ANY_PATH.sub(ELSEWHERE, text)


def to_http(exc: BaseException, paths: HostPaths | None = None) -> tuple[int, str]:
    """The status and message a client gets for `exc`: an ApiError as it is, a runtime error with its own
    status, envd not answering as a sandbox that did not start, anything else as 500 with its type."""
    if isinstance(exc, ApiError):
        status, message = exc.status, exc.message
    elif isinstance(exc, RuntimeError_):
        status, message = exc.status, str(exc)
    elif isinstance(exc, EnvdUnavailable):
        status, message = 500, f"the sandbox did not start: {exc}"
    else:
        status, message = 500, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RuntimeError_) and not exc.names_host_paths:
        return status, message
    return status, (paths or HostPaths()).hide(message)
