"""Connect endpoint tables for our two services (what a connect-python code generator would emit)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.server import ConnectASGIApplication, Endpoint

from corral.envd.proto import filesystem_pb as fs
from corral.envd.proto import process_pb as pr

_UNARY, _SERVER_STREAM, _CLIENT_STREAM = "unary", "server_stream", "client_stream"

PROCESS_METHODS = (
    ("List", _UNARY, pr.ListRequest, pr.ListResponse, "list"),
    ("Connect", _SERVER_STREAM, pr.ConnectRequest, pr.ConnectResponse, "connect"),
    ("Start", _SERVER_STREAM, pr.StartRequest, pr.StartResponse, "start"),
    ("Update", _UNARY, pr.UpdateRequest, pr.UpdateResponse, "update"),
    ("StreamInput", _CLIENT_STREAM, pr.StreamInputRequest, pr.StreamInputResponse, "stream_input"),
    ("SendInput", _UNARY, pr.SendInputRequest, pr.SendInputResponse, "send_input"),
    ("SendSignal", _UNARY, pr.SendSignalRequest, pr.SendSignalResponse, "send_signal"),
    ("CloseStdin", _UNARY, pr.CloseStdinRequest, pr.CloseStdinResponse, "close_stdin"),
)

FILESYSTEM_METHODS = (
    ("Stat", _UNARY, fs.StatRequest, fs.StatResponse, "stat"),
    ("MakeDir", _UNARY, fs.MakeDirRequest, fs.MakeDirResponse, "make_dir"),
    ("Move", _UNARY, fs.MoveRequest, fs.MoveResponse, "move"),
    ("ListDir", _UNARY, fs.ListDirRequest, fs.ListDirResponse, "list_dir"),
    ("Remove", _UNARY, fs.RemoveRequest, fs.RemoveResponse, "remove"),
    ("WatchDir", _SERVER_STREAM, fs.WatchDirRequest, fs.WatchDirResponse, "watch_dir"),
    ("CreateWatcher", _UNARY, fs.CreateWatcherRequest, fs.CreateWatcherResponse, "create_watcher"),
    ("GetWatcherEvents", _UNARY, fs.GetWatcherEventsRequest, fs.GetWatcherEventsResponse,
     "get_watcher_events"),
    ("RemoveWatcher", _UNARY, fs.RemoveWatcherRequest, fs.RemoveWatcherResponse, "remove_watcher"),
)


class ServiceApplication(ConnectASGIApplication[Any]):
    """One Connect service served over ASGI, built from a method table."""

    def __init__(self, service_name: str, methods: tuple, service: object) -> None:
        self._service_path = f"/{service_name}"

        def endpoints(svc: object) -> Mapping[str, Endpoint]:
            table: dict[str, Endpoint] = {}
            for name, kind, request, response, attr in methods:
                info = MethodInfo(name=name, service_name=service_name, input=request, output=response,
                                  idempotency_level=IdempotencyLevel.UNKNOWN)
                make: Callable = getattr(Endpoint, kind)
                table[f"/{service_name}/{name}"] = make(method=info, function=getattr(svc, attr))
            return table

        # Bodies of unary calls are small; uploads go through /files, not RPC.
        super().__init__(service=service, endpoints=endpoints, read_max_bytes=16 * 1024 * 1024)

    @property
    def path(self) -> str:
        return self._service_path
