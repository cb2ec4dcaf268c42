"""The gVisor backend's snapshot format; the only code that opens a snapshot's files.

A snapshot directory holds:

  image/            runsc's uncompressed memory image (absent when filesystem-only or dropped)
  layer/            a copy of the sandbox's upper directory at checkpoint time, read-only from then on
  checkpoint.json   the lower layers it stands on, the command that cold-boots it, platform, resources

A layer is shared, never copied: sandboxes and later snapshots stack it read-only under their own
changes, so a snapshot's `stands_on` names the snapshot directories (and template files) below it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.runtime.base import CheckpointInvalid, Resources, Snapshot
from corral.storage.disk import tree_size

META = "checkpoint.json"
IMAGE = "image"
LAYER = "layer"


@dataclass(frozen=True, eq=False, repr=False)
class GVisorSnapshot(Snapshot):
    path: Path
    template: str
    lowers: tuple[Path, ...]  # read-only layers below its own, top first
    command: tuple[str, ...]  # what cold-boots it
    cwd: str
    platform: str
    memory: bool

    @property
    def has_memory(self) -> bool:
        return self.memory

    @property
    def layer(self) -> Path:
        return self.path / LAYER

    @property
    def image(self) -> Path:
        return self.path / IMAGE

    @property
    def layers(self) -> list[Path]:
        """Every layer a container started from it mounts, top first."""
        return [self.layer, *self.lowers]

    @property
    def stands_on(self) -> frozenset[Path]:
        return frozenset(owner_of(layer) for layer in self.lowers)

    @property
    def size_bytes(self) -> int:
        return tree_size(self.path) if self.path.is_dir() else 0

    def drop_memory(self) -> int:
        if not self.image.is_dir():
            return 0
        freed = tree_size(self.image)
        shutil.rmtree(self.image, ignore_errors=True)
        try:
            meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError):
            return freed
        meta["memory"] = False
        _write_meta(self.path, meta)
        return freed


def owner_of(layer: Path) -> Path:
    """What a lower layer belongs to: the snapshot directory for a snapshot's `layer/`, else itself."""
    return layer.parent if layer.name == LAYER and (layer.parent / META).is_file() else layer


def open_snapshot(path: Path, platform: str) -> GVisorSnapshot:
    try:
        meta = json.loads((path / META).read_text())
        lowers = tuple(Path(p) for p in meta["lowers"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointInvalid(f"{path} is not a Corral checkpoint: {exc}") from None
    memory = meta.get("memory", True)
    if memory and not (path / IMAGE / "checkpoint.img").is_file():
        raise CheckpointInvalid(f"{path} has no memory image (image/checkpoint.img)")
    for layer in [path / LAYER, *lowers]:
        if not layer.is_dir():
            raise CheckpointInvalid(f"layer {layer} of checkpoint {path} is missing")
    if meta.get("platform") != platform:
        raise CheckpointInvalid(f"checkpoint was taken on platform {meta.get('platform')}, this runtime "
                                f"uses {platform}")
    return GVisorSnapshot(path=path, template=meta["template"], lowers=lowers,
                          command=tuple(meta.get("command") or ()), cwd=meta.get("cwd", "/"),
                          platform=platform, memory=memory)


def write_meta(staging: Path, *, template: str, lowers: list[Path], platform: str, memory: bool,
               command: list[str], cwd: str, resources: Resources) -> None:
    _write_meta(staging, {"template": template, "lowers": [str(p) for p in lowers], "platform": platform,
                          "created_at": time.time(), "memory": memory, "command": command, "cwd": cwd,
                          "resources": asdict(resources)})


def _write_meta(directory: Path, meta: dict) -> None:
    tmp = directory / f"{META}.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.rename(directory / META)


def link_copy(source: Path, target: Path) -> None:
    """A second snapshot directory with the same content, sharing files through hard links (both are
    read-only from now on); built beside the target and renamed, so it never looks complete half-way."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(["cp", "-al", str(source), str(staging)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging.rename(target)


def recorded_lowers(directory: Path) -> set[Path]:
    """The layers a snapshot directory or a container's directory (its record) says it stands on, without
    checking them (empty when there is nothing readable): for reclaiming disk, where one broken snapshot
    must not stop the rest."""
    for name in (META, "record.json"):
        try:
            lowers = json.loads((directory / name).read_text()).get("lowers", [])
        except (OSError, ValueError, AttributeError):
            continue
        return {Path(p) for p in lowers if isinstance(p, str)}
    return set()
