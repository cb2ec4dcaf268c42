"""A kernel's IOPub messages, read by the event loop as they arrive.

jupyter_client's async `get_iopub_msg` polls the socket afresh for every message (a poller, a future and
a timer each time); under gVisor that is about 1 ms per execution of `1+1`. Here the socket's file
descriptor stays registered with the loop, and each wake-up reads every message waiting, without
blocking, into a queue. Nothing else may read the IOPub socket while an `IOPub` is open on it.

The queue holds at most `QUEUE_MAX` messages (output nobody reads yet, e.g. from a kernel thread that
prints between executions): past that it stops reading, and the socket's own limit applies, as it did
with jupyter_client.
"""

from __future__ import annotations

import asyncio
import logging

import zmq

log = logging.getLogger("corral.interpreter")

QUEUE_MAX = 1000


class IOPub:
    def __init__(self, client) -> None:
        self._session = client.session
        # A plain (blocking-API) view of the client's socket; the client still owns and closes it.
        self._socket = zmq.Socket.shadow(client.iopub_channel.socket.underlying)
        self._queue: asyncio.Queue[dict] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._fd = self._socket.getsockopt(zmq.FD)
        self._reading = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        self._loop.add_reader(self._fd, self._drain)
        self._reading = True
        self._drain()  # what arrived while nobody was reading

    def _drain(self) -> None:
        # The descriptor only says "something changed" (edge-triggered): read until nothing is left.
        while True:
            if self._queue.qsize() >= QUEUE_MAX:
                self._loop.remove_reader(self._fd)
                self._reading = False
                return
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed under us: close() comes next
                return
            try:
                _, message = self._session.feed_identities(parts)
                self._queue.put_nowait(self._session.deserialize(message))
            except Exception:  # a malformed message must not stop the draining of the ones behind it
                log.exception("dropped an IOPub message that could not be read")

    async def next(self, timeout: float) -> dict | None:
        """The next message, or None after `timeout` seconds without one."""
        if not self._reading and self._queue.qsize() < QUEUE_MAX // 2:
            self._resume_reading()
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        """Before the client's channels stop: the loop must not watch a closed descriptor."""
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
