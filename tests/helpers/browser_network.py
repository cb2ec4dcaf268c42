"""A network namespace for a test's browser whose loopback reaches the host's.

Chromium fails its requests in flight with ERR_NETWORK_CHANGED whenever an address comes or goes on any
interface it can see, loopback requests included, and every sandbox the tests start or stop adds or
removes an address on a host veth (a dashboard test once lost half of noVNC's scripts that way in CI).
In a namespace of its own the browser sees no such change. nftables there redirects its TCP connections
to 127.0.0.0/8 (any port) to one listener; the test process accepts them, reads the port the browser
asked for (SO_ORIGINAL_DST) and connects to that port on the host's loopback, then copies bytes both ways.
Names and URLs stay what they were: the browser still asks for 127.0.0.1:<port>.

    with browser_network() as wrapper:     # an executable that runs Chromium in the namespace
        playwright.chromium.launch(executable_path=wrapper, ...)
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h

_libc = ctypes.CDLL(None, use_errno=True)
_numbers = itertools.count()


def _listener_in(netns_path: Path) -> socket.socket:
    """A TCP listener on 127.0.0.1 made inside the namespace (a socket stays in the namespace it was made
    in; the namespace is switched for one short-lived thread only)."""
    made: dict = {}

    def make() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns_path}")
            finally:
                os.close(fd)
            listener = socket.create_server(("127.0.0.1", 0), backlog=128)
            made["listener"] = listener
        except BaseException as e:  # handed to the caller's thread
            made["error"] = e

    thread = threading.Thread(target=make, name="browser-netns-listener")
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["listener"]


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        # One side went away: end both, as a direct connection would.
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _LoopbackBridge:
    """Accepts the namespace's redirected connections and joins each to the same port on the host."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name="browser-netns-bridge", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._join, args=(inside,), daemon=True).start()

    def _join(self, inside: socket.socket) -> None:
        try:
            original = inside.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", original, 2)[0]
            address = socket.inet_ntoa(original[4:8])
            outside = socket.create_connection((address, port), timeout=10)
            outside.settimeout(None)
        except OSError:
            inside.close()  # the browser sees the connection end, as it would a refused one
            return
        with self.lock:
            if self.closed:
                inside.close()
                outside.close()
                return
            self.sockets.update((inside, outside))
        try:
            back = threading.Thread(target=_copy, args=(outside, inside), daemon=True)
            back.start()
            _copy(inside, outside)
            back.join()
        finally:
            with self.lock:
                self.sockets.difference_update((inside, outside))
            inside.close()
            outside.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            open_sockets = list(self.sockets)
        self.listener.close()
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)


@contextlib.contextmanager
def browser_network(browser: str) -> Iterator[Path]:
    """A namespace with the loopback bridge, and an executable that runs `browser` (with the arguments it
    is given) inside it. Everything is removed on the way out."""
    name = f"ctest-browser-{os.getpid()}-{next(_numbers)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        netns_path = Path("/run/netns") / name
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        listener = _listener_in(netns_path)
        port = listener.getsockname()[1]
        ruleset = (
            "table ip browser {\n"
            "  chain output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f"    ip daddr 127.0.0.0/8 tcp dport != {port} redirect to :{port}\n"
            "  }\n"
            "}\n")
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=ruleset, text=True, check=True,
                       capture_output=True)
        bridge = _LoopbackBridge(listener)
        try:
            with tempfile.TemporaryDirectory(prefix="corral-browser-") as directory:
                wrapper = Path(directory) / "browser"
                # exec: the browser keeps the wrapper's pid, which is the one Playwright watches and ends.
                wrapper.write_text(f'#!/bin/sh\nexec nsenter --net={netns_path} -- {browser} "$@"\n')
                wrapper.chmod(0o755)
                yield wrapper
        finally:
            bridge.close()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
