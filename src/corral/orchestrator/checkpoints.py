"""Checkpoint directories on this node and when their disk space can be given back.

  <data>/checkpoints/<node id>/image/            memory image (absent when filesystem-only or dropped)
  <data>/checkpoints/<node id>/layer/            the files the sandbox had changed, read-only from now on
  <data>/checkpoints/<node id>/checkpoint.json   the layers below it and how to cold-boot it

A layer is shared, never copied: sandboxes and later checkpoints stack it read-only under their own
changes. So a checkpoint that is deleted keeps its layer for as long as anything stands on it; its memory
image goes at once, since a restored sandbox holds its memory privately.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from corral.runtime.base import Runtime
from corral.storage.disk import tree_size


class CheckpointFiles:
    def __init__(self, root: Path, runtime: Runtime) -> None:
        self.root = root
        self._runtime = runtime

    def path(self, node_id: str) -> Path:
        return self.root / node_id

    def complete(self, node_id: str) -> bool:
        return (self.path(node_id) / "checkpoint.json").is_file()

    def has_memory(self, node_id: str) -> bool:
        return (self.path(node_id) / "image" / "checkpoint.img").is_file()

    def size(self, node_id: str) -> int:
        path = self.path(node_id)
        return tree_size(path) if path.is_dir() else 0

    def drop_image(self, node_id: str) -> int:
        """Deletes the memory image (the node becomes filesystem-only); returns the bytes freed."""
        image = self.path(node_id) / "image"
        if not image.is_dir():
            return 0
        freed = tree_size(image)
        shutil.rmtree(image, ignore_errors=True)
        meta_path = self.path(node_id) / "checkpoint.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return freed
        meta["memory"] = False
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.rename(meta_path)
        return freed

    def link_copy(self, source_id: str, node_id: str) -> None:
        """A second checkpoint with the same content as `source_id`, sharing its files through hard links
        (both are read-only from now on)."""
        target = self.path(node_id)
        staging = target.with_name(f".{node_id}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(["cp", "-al", str(self.path(source_id)), str(staging)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        staging.rename(target)

    def _lowers(self, node_id: str) -> set[Path]:
        try:
            meta = json.loads((self.path(node_id) / "checkpoint.json").read_text())
        except (OSError, ValueError):
            return set()
        return {Path(p) for p in meta.get("lowers", [])}

    def reclaim(self, keep: set[str], *, busy: set[str] = frozenset(), partials: bool = False) -> int:
        """Removes what nothing needs any more: directories of checkpoints not in `keep` (their memory image
        at once, their layer once no sandbox and no kept checkpoint stands on it). `busy` ids are being
        written right now and are left alone; `partials` also removes interrupted writes (at start-up).
        Returns the bytes freed."""
        if not self.root.is_dir():
            return 0
        freed = 0
        candidates = []
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                if partials:
                    freed += tree_size(entry)
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.name not in keep and entry.name not in busy:
                candidates.append(entry)
        if not candidates:  # the common case on every kill: nothing to decide, no checkpoint.json to read
            return freed
        needed = set(self._runtime.layers_in_use())
        for node_id in keep:
            needed |= self._lowers(node_id)
        for entry in candidates:
            name = entry.name
            if entry / "layer" in needed:
                freed += self.drop_image(name)
                continue
            freed += tree_size(entry)
            shutil.rmtree(entry, ignore_errors=True)
        return freed
