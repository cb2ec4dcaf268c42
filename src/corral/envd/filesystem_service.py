"""The `filesystem.Filesystem` Connect service."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from corral.envd import paths
from corral.envd.entry import SIDECAR, entry_info
from corral.envd.process_service import keepalive_interval
from corral.envd.proto import filesystem_pb as fs
from corral.envd.requests import request_user
from corral.envd.state import SandboxState
from corral.envd.users import User
from corral.envd.watch import DirectoryWatch

# A polling watcher nobody reads keeps at most this many events (the oldest are dropped).
MAX_BUFFERED_EVENTS = 10_000
MAX_LIST_ENTRIES = 100_000


@contextlib.contextmanager
def _fs_errors(path: str) -> Iterator[None]:
    try:
        yield
    except paths.AccessDenied as e:
        raise ConnectError(Code.PERMISSION_DENIED, str(e)) from None
    except FileNotFoundError:
        raise ConnectError(Code.NOT_FOUND, f"path '{path}' does not exist") from None
    except NotADirectoryError:
        raise ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory") from None
    except PermissionError as e:
        raise ConnectError(Code.PERMISSION_DENIED, f"{e.strerror}: '{path}'") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, "not enough disk space") from None
        raise ConnectError(Code.INTERNAL, f"{e.strerror or e}: '{path}'") from None


class FilesystemService:
    def __init__(self, state: SandboxState) -> None:
        self._state = state
        self._watchers: dict[str, tuple[DirectoryWatch, list[fs.FilesystemEvent]]] = {}

    def _target(self, raw: str, ctx: RequestContext) -> tuple[str, User]:
        if not raw:
            raise ConnectError(Code.INVALID_ARGUMENT, "path is required")
        user = request_user(ctx.request_headers.get("authorization"), self._state)
        return paths.resolve(raw, user), user

    async def stat(self, request: fs.StatRequest, ctx: RequestContext) -> fs.StatResponse:
        path, user = self._target(request.path, ctx)
        with _fs_errors(path):
            paths.check_lookup(path, user)
            return fs.StatResponse(entry=entry_info(path))

    async def make_dir(self, request: fs.MakeDirRequest, ctx: RequestContext) -> fs.MakeDirResponse:
        path, user = self._target(request.path, ctx)
        with _fs_errors(path):
            if os.path.lexists(path):
                if os.path.isdir(path):
                    raise ConnectError(Code.ALREADY_EXISTS, f"directory '{path}' already exists")
                raise ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' exists and is not a directory")
            # Every missing directory is created for the user, as E2B's envd does (see paths.check_write).
            paths.check_lookup(path, user)
            paths.make_parents(path, user)
            return fs.MakeDirResponse(entry=entry_info(path))

    async def move(self, request: fs.MoveRequest, ctx: RequestContext) -> fs.MoveResponse:
        source, user = self._target(request.source, ctx)
        destination, _ = self._target(request.destination, ctx)
        with _fs_errors(source):
            if not os.path.lexists(source):
                raise FileNotFoundError(source)
            paths.check_remove(source, user)
            paths.check_write(destination, user)
            paths.make_parents(os.path.dirname(destination), user)
            os.rename(source, destination)
            return fs.MoveResponse(entry=entry_info(destination))

    async def list_dir(self, request: fs.ListDirRequest, ctx: RequestContext) -> fs.ListDirResponse:
        path, user = self._target(request.path or ".", ctx)
        depth = max(1, request.depth)
        with _fs_errors(path):
            paths.check_read(path, user)
            if not os.path.isdir(path):
                if os.path.lexists(path):
                    raise NotADirectoryError(path)
                raise FileNotFoundError(path)
            entries: list[fs.EntryInfo] = []
            self._walk(path, depth, user, entries)
            return fs.ListDirResponse(entries=entries)

    def _walk(self, directory: str, depth: int, user: User, out: list[fs.EntryInfo]) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return  # unreadable subdirectory: list what we can
        for name in names:
            if len(out) >= MAX_LIST_ENTRIES:
                raise ConnectError(Code.RESOURCE_EXHAUSTED, f"more than {MAX_LIST_ENTRIES} entries")
            full = os.path.join(directory, name)
            try:
                out.append(entry_info(full))
            except FileNotFoundError:
                continue
            descend = depth > 1 and os.path.isdir(full) and not os.path.islink(full)
            if descend and (user.is_root or user.may(os.stat(full), paths.READ | paths.SEARCH)):
                self._walk(full, depth - 1, user, out)

    async def remove(self, request: fs.RemoveRequest, ctx: RequestContext) -> fs.RemoveResponse:
        path, user = self._target(request.path, ctx)
        with _fs_errors(path):
            if not os.path.lexists(path):
                return fs.RemoveResponse()  # like RemoveAll: nothing to do is not an error
            paths.check_remove(path, user)
            if os.path.isdir(path) and not os.path.islink(path):
                await asyncio.to_thread(shutil.rmtree, path)
            else:
                with contextlib.suppress(OSError):
                    SIDECAR.forget(os.stat(path))
                os.unlink(path)
        return fs.RemoveResponse()

    # --- watching --------------------------------------------------------------------------------

    def _open_watch(self, request, ctx: RequestContext, sink) -> DirectoryWatch:
        path, user = self._target(request.path, ctx)
        include_entry = request.include_entry

        def listener(name: str, kind: fs.EventType, absolute: str) -> None:
            entry = None
            if include_entry and kind not in (fs.EventType.REMOVE, fs.EventType.RENAME):
                with contextlib.suppress(OSError):
                    entry = entry_info(absolute)
            sink(fs.FilesystemEvent(name=name, type=kind, entry=entry))

        with _fs_errors(path):
            paths.check_read(path, user)
            if not os.path.isdir(path):
                if os.path.lexists(path):
                    raise NotADirectoryError(path)
                raise FileNotFoundError(path)
            return DirectoryWatch(path, request.recursive, listener)

    async def watch_dir(self, request: fs.WatchDirRequest, ctx: RequestContext
                        ) -> AsyncIterator[fs.WatchDirResponse]:
        queue: asyncio.Queue[fs.FilesystemEvent] = asyncio.Queue()
        watch = self._open_watch(request, ctx, queue.put_nowait)
        interval = keepalive_interval(ctx)
        try:
            yield fs.WatchDirResponse(event=Oneof("start", fs.WatchDirResponse.StartEvent()))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    yield fs.WatchDirResponse(event=Oneof("keepalive", fs.WatchDirResponse.KeepAlive()))
                    continue
                yield fs.WatchDirResponse(event=Oneof("filesystem", event))
        finally:
            watch.close()

    async def create_watcher(self, request: fs.CreateWatcherRequest, ctx: RequestContext
                             ) -> fs.CreateWatcherResponse:
        buffer: list[fs.FilesystemEvent] = []

        def sink(event: fs.FilesystemEvent) -> None:
            buffer.append(event)
            if len(buffer) > MAX_BUFFERED_EVENTS:
                del buffer[0]

        watch = self._open_watch(request, ctx, sink)
        watcher_id = uuid.uuid4().hex
        self._watchers[watcher_id] = (watch, buffer)
        return fs.CreateWatcherResponse(watcher_id=watcher_id)

    def _watcher(self, watcher_id: str):
        try:
            return self._watchers[watcher_id]
        except KeyError:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {watcher_id} not found") from None

    async def get_watcher_events(self, request: fs.GetWatcherEventsRequest, ctx: RequestContext
                                 ) -> fs.GetWatcherEventsResponse:
        watch, buffer = self._watcher(request.watcher_id)
        watch.poll()  # pick up what the kernel has queued but the loop has not read yet
        events = list(buffer)
        buffer.clear()
        return fs.GetWatcherEventsResponse(events=events)

    async def remove_watcher(self, request: fs.RemoveWatcherRequest, ctx: RequestContext
                             ) -> fs.RemoveWatcherResponse:
        watch, _ = self._watcher(request.watcher_id)
        watch.close()
        del self._watchers[request.watcher_id]
        return fs.RemoveWatcherResponse()

    def close(self) -> None:
        for watch, _ in self._watchers.values():
            watch.close()
        self._watchers.clear()
