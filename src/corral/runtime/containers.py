"""A backend's one table of containers, each with an explicit state (shared by every backend).

A container is born PREPARING, and `ContainerTable.move` is the only way its state changes, checked
against the transitions below, so any code (teardown above all) can tell what it holds. Teardown moves a
container to TEARING_DOWN exactly once; whoever does that frees its resources, everyone else waits for
`gone`. What a container holds besides its state is the backend's own (its row type).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from corral.runtime.base import ContainerState, SandboxNotFound

S = ContainerState
ALLOWED: dict[ContainerState, frozenset[ContainerState]] = {
    S.PREPARING: frozenset({S.PREPARED, S.TEARING_DOWN}),
    S.PREPARED: frozenset({S.STARTING, S.TEARING_DOWN}),
    S.STARTING: frozenset({S.LIVE, S.TEARING_DOWN}),
    S.LIVE: frozenset({S.CHECKPOINTING, S.TEARING_DOWN}),
    S.CHECKPOINTING: frozenset({S.LIVE, S.TEARING_DOWN}),
    S.TEARING_DOWN: frozenset({S.GONE}),
    S.GONE: frozenset(),
}


class IllegalTransition(Exception):
    """A container was asked to change state in a way its life does not allow (a bug, or a race lost)."""


class ContainerRow(Protocol):
    """What the table needs of a backend's container."""

    id: str
    state: ContainerState
    gone: asyncio.Event  # set when teardown has finished


C = TypeVar("C", bound=ContainerRow)


class ContainerTable(Generic[C]):
    def __init__(self) -> None:
        self._containers: dict[str, C] = {}

    def add(self, container: C) -> C:
        if container.id in self._containers:
            raise IllegalTransition(f"container {container.id} exists already")
        self._containers[container.id] = container
        return container

    def move(self, container: C, to: ContainerState) -> None:
        if to not in ALLOWED[container.state]:
            raise IllegalTransition(f"container {container.id}: {container.state.value} -> {to.value}")
        container.state = to
        if to is ContainerState.GONE:
            self._containers.pop(container.id, None)
            container.gone.set()

    def get(self, container_id: str) -> C | None:
        return self._containers.get(container_id)

    def live(self, sandbox_id: str) -> C:
        """The sandbox `sandbox_id` (live, or being checkpointed); SandboxNotFound otherwise."""
        container = self._containers.get(sandbox_id)
        if container is None or container.state not in (ContainerState.LIVE, ContainerState.CHECKPOINTING):
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist")
        return container

    def in_state(self, *states: ContainerState) -> list[C]:
        return [c for c in self._containers.values() if c.state in states]

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._containers.values()))

    def __len__(self) -> int:
        return len(self._containers)
