"""The one in-memory record of which sandboxes are live on this node: what the proxy routes to, what the
idle freezer watches and what lifecycle acts on. The database holds what must survive a restart; the
runtime holds containers; this holds the link between an API id and its running container."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from corral.runtime.base import Sandbox


@dataclass
class LiveSandbox:
    api_id: str
    sandbox: Sandbox  # the runtime's container (its id changes on every resume)
    token: str  # envd's access token: signed file URLs are checked against it
    # Set while no checkpoint of it is being taken; new connections through the proxy wait on it.
    reachable: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.reachable.set()


class Registry:
    def __init__(self) -> None:
        self._live: dict[str, LiveSandbox] = {}

    def add(self, api_id: str, sandbox: Sandbox, token: str) -> LiveSandbox:
        entry = self._live[api_id] = LiveSandbox(api_id, sandbox, token)
        return entry

    def remove(self, api_id: str) -> LiveSandbox | None:
        entry = self._live.pop(api_id, None)
        if entry is not None:
            entry.reachable.set()  # whoever waits finds it gone
        return entry

    def get(self, api_id: str) -> LiveSandbox | None:
        return self._live.get(api_id)

    def ids(self) -> set[str]:
        return set(self._live)

    def entries(self) -> list[LiveSandbox]:
        return list(self._live.values())

    def __contains__(self, api_id: str) -> bool:
        return api_id in self._live

    def __len__(self) -> int:
        return len(self._live)
