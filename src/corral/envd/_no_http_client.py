"""Stands in for `pyqwest`, the HTTP *client* connectrpc imports at module level for its gRPC client
helpers. envd only serves the Connect protocol, never calls out, and saves ~4 MiB of resident memory
by not shipping or loading that native library. Anything that really used it would fail loudly."""

from __future__ import annotations


class _Unavailable:
    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("envd has no HTTP client (pyqwest is not installed in the sandbox)")


Headers = Client = SyncClient = FullResponse = Response = SyncResponse = _Unavailable
ReadError = WriteError = StreamError = type("TransportError", (Exception,), {})
StreamErrorCode = None
