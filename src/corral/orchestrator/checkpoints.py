"""Where this node keeps the snapshots of the checkpoint tree, and when their disk space can be given back.

  <data>/checkpoints/<node id>/   one snapshot per node, in the runtime's own format

A snapshot may stand on others (the runtime shares their files instead of copying them): one that is
deleted keeps what others stand on for as long as they do; its memory goes at once, since a restored
sandbox holds its memory privately. Only the runtime opens the files; here they are `Snapshot` values.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from corral.runtime.base import CheckpointInvalid, Runtime, Snapshot
from corral.storage.disk import tree_size


class CheckpointFiles:
    def __init__(self, root: Path, runtime: Runtime) -> None:
        self.root = root
        self._runtime = runtime

    def path(self, node_id: str) -> Path:
        return self.root / node_id

    def snapshot(self, node_id: str) -> Snapshot:
        """The node's snapshot; CheckpointInvalid when it is missing or incomplete."""
        return self._runtime.open_snapshot(self.path(node_id))

    def _maybe(self, node_id: str) -> Snapshot | None:
        try:
            return self.snapshot(node_id)
        except CheckpointInvalid:
            return None

    def complete(self, node_id: str) -> bool:
        return self._maybe(node_id) is not None

    def has_memory(self, node_id: str) -> bool:
        snapshot = self._maybe(node_id)
        return snapshot is not None and snapshot.has_memory

    def size(self, node_id: str) -> int:
        path = self.path(node_id)
        return tree_size(path) if path.is_dir() else 0

    def drop_memory(self, node_id: str) -> int:
        """Deletes the memory image (the node becomes filesystem-only); returns the bytes freed."""
        snapshot = self._maybe(node_id)
        return snapshot.drop_memory() if snapshot is not None else 0

    def link_copy(self, source_id: str, node_id: str) -> None:
        """A second snapshot with the same content as `source_id`, sharing its files."""
        self._runtime.copy_snapshot(self.snapshot(source_id), self.path(node_id))

    async def reclaim(self, keep: set[str], *, busy: set[str] = frozenset(), partials: bool = False) -> int:
        """Removes what nothing needs any more: snapshots not in `keep` (their memory at once, the rest once
        no sandbox and no kept snapshot stands on it). `busy` ids are being written right now and are left
        alone; `partials` also removes interrupted writes (at start-up). Returns the bytes freed.

        What goes is decided and renamed out of the way without yielding to the event loop (the caller's
        view of `keep` stays true meanwhile); the slow part, deleting the files, runs in a thread. A crash
        in between leaves hidden directories, which the next start-up's `partials` removes."""
        if not self.root.is_dir():
            return 0
        doomed: list[Path] = []
        candidates = []
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                if partials:
                    doomed.append(entry)
            elif entry.name not in keep and entry.name not in busy:
                candidates.append(entry)
        freed = 0
        if candidates:  # the common case on every kill is none: nothing to decide, nothing to open
            needed = set(self._runtime.in_use())
            for node_id in keep:
                if (snapshot := self._maybe(node_id)) is not None:
                    needed |= snapshot.stands_on
            for entry in candidates:
                if entry in needed:
                    freed += self.drop_memory(entry.name)
                    continue
                gone = entry.with_name(f".gone-{entry.name}")
                entry.rename(gone)
                doomed.append(gone)
        if doomed:
            freed += await asyncio.to_thread(_remove, doomed)
        return freed


def _remove(paths: list[Path]) -> int:
    freed = 0
    for path in paths:
        freed += tree_size(path)
        shutil.rmtree(path, ignore_errors=True)
    return freed
