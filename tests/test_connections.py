"""The host's view of TCP connections into a sandbox address (what a checkpoint waits on)."""

from __future__ import annotations

import socket
import time

from corral.network.connections import open_connections_to

# Loopback addresses of their own, so that other programs' connections do not count.
SERVER, CLIENT = "127.0.0.77", "127.0.0.78"


def _eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_connection_counts_until_the_far_end_has_closed_its_side():
    listener = socket.create_server((SERVER, 0))
    assert open_connections_to(SERVER) == 0  # a listening socket has no remote address
    client = socket.create_connection(listener.getsockname(), source_address=(CLIENT, 0))
    server_side, _ = listener.accept()
    try:
        assert open_connections_to(SERVER) == 1  # the client's socket, whose far end is SERVER
        assert open_connections_to(CLIENT) == 1  # the accepted one
        client.close()  # the client's FIN is acknowledged, but the far end has not closed (CLOSE_WAIT)
        time.sleep(0.05)
        assert open_connections_to(SERVER) == 1
        server_side.close()  # now it has: the client's socket is in TIME_WAIT, which does not count
        assert _eventually(lambda: open_connections_to(SERVER) == 0 and open_connections_to(CLIENT) == 0)
    finally:
        server_side.close()
        listener.close()
