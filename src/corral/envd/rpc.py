"""Connect endpoint tables for our two services (what a connect-python code generator would emit)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.server import ConnectASGIApplication, Endpoint
from protobuf import Message

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


class _StrictJSONCodec:
    """The protobuf JSON codec, with undecodable bodies reported as invalid_argument (not internal)."""

    def __init__(self, inner: Codec) -> None:
        self._inner = inner

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Message) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type) -> Message:
        try:
            return self._inner.decode(data, message_class)
        except Exception as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"cannot decode the request: {e}") from None


def _codecs() -> list:
    from connectrpc._codec import get_default_codecs

    return [_StrictJSONCodec(codec) for codec in get_default_codecs()]


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
        super().__init__(service=service, endpoints=endpoints, read_max_bytes=16 * 1024 * 1024,
                         codecs=_codecs())
        self._server_streams = {f"/{service_name}/{name}" for name, kind, *_ in methods
                                if kind == _SERVER_STREAM}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self._server_streams:
            await super().__call__(scope, receive, send)
            return
        # A server-streaming request is one small envelope: read it whole and check its framing here,
        # so a truncated or oversized body gets a clear error instead of confusing the stream handler.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > _MAX_STREAM_REQUEST:
                await _stream_error(send, "request too large")
                return
        if (problem := _framing_problem(bytes(body))) is not None:
            await _stream_error(send, problem)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await super().__call__(scope, replay, send)

    @property
    def path(self) -> str:
        return self._service_path


_MAX_STREAM_REQUEST = 4 * 1024 * 1024


def _framing_problem(body: bytes) -> str | None:
    if len(body) < 5:
        return "truncated envelope: missing the 5-byte header"
    flags, length = struct.unpack(">BI", body[:5])
    if flags & 0x01:
        return "compressed envelopes are not supported"
    if len(body) - 5 < length:
        return f"truncated envelope: header says {length} bytes, body has {len(body) - 5}"
    if len(body) - 5 > length:
        return "a server-streaming request carries exactly one message"
    return None


async def _stream_error(send, message: str) -> None:
    """A Connect streaming response that is only an end-of-stream frame carrying the error."""
    payload = json.dumps({"error": {"code": "invalid_argument", "message": message}}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/connect+json")]})
    await send({"type": "http.response.body", "body": struct.pack(">BI", 2, len(payload)) + payload})
