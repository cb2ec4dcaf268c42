"""Directory watching on inotify, reported as E2B filesystem events."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from inotify_simple import INotify
from inotify_simple import flags as F

from corral.envd.proto import filesystem_pb as fs

_MASK = (F.CREATE | F.MODIFY | F.DELETE | F.MOVED_FROM | F.MOVED_TO | F.ATTRIB
         | F.DELETE_SELF | F.MOVE_SELF)

# The same classification as fsnotify, which E2B's envd reports.
_KINDS = (
    (F.CREATE | F.MOVED_TO, fs.EventType.CREATE),
    (F.MODIFY, fs.EventType.WRITE),
    (F.DELETE | F.DELETE_SELF, fs.EventType.REMOVE),
    (F.MOVED_FROM | F.MOVE_SELF, fs.EventType.RENAME),
    (F.ATTRIB, fs.EventType.CHMOD),
)

Listener = Callable[[str, "fs.EventType", str], None]  # (name relative to root, type, absolute path)


class DirectoryWatch:
    """Watches `root` (and, when recursive, every directory below it, including new ones)."""

    def __init__(self, root: str, recursive: bool, listener: Listener) -> None:
        self.root = root
        self.recursive = recursive
        self._listener = listener
        self._inotify = INotify()
        self._paths: dict[int, str] = {}
        try:
            self._add(root)
            if recursive:
                self._add_tree(root)
        except BaseException:
            self._inotify.close()
            raise
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self.poll)

    def _add(self, path: str) -> None:
        wd = self._inotify.add_watch(path, _MASK)
        self._paths[wd] = path

    def _add_tree(self, top: str) -> None:
        for dirpath, dirnames, _ in os.walk(top):
            for name in dirnames:
                with contextlib.suppress(OSError):  # vanished or unreadable: skip it
                    self._add(os.path.join(dirpath, name))

    def poll(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except OSError:
            return
        for event in events:
            directory = self._paths.get(event.wd)
            if directory is None:
                continue
            if event.mask & F.IGNORED:
                self._paths.pop(event.wd, None)
                continue
            path = os.path.join(directory, event.name) if event.name else directory
            if self.recursive and event.mask & F.ISDIR and event.mask & (F.CREATE | F.MOVED_TO):
                with contextlib.suppress(OSError):
                    self._add(path)
                    self._add_tree(path)
            if event.mask & (F.DELETE_SELF | F.MOVE_SELF) and directory != self.root:
                continue  # reported by the parent as a remove or rename of its entry
            for bits, kind in _KINDS:
                if event.mask & bits:
                    self._listener(os.path.relpath(path, self.root), kind, path)
                    break

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
        self._inotify.close()
