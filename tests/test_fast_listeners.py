"""`corral serve`'s listening sockets (cli/serve.py `_bind`): loopback on both 127.0.0.1 and ::1, and
connections accepted on them have Nagle off, as asyncio does it only for sockets that say they are TCP."""

from __future__ import annotations

import asyncio
import socket

import pytest
import typer

from corral.cli.serve import _bind


def test_loopback_listens_on_ipv4_and_ipv6_when_it_can():
    sockets = _bind("127.0.0.1", 0, "HTTP")
    try:
        families = {s.family for s in sockets}
        assert socket.AF_INET in families
        assert all(s.proto == socket.IPPROTO_TCP for s in sockets)
    finally:
        for s in sockets:
            s.close()


def test_accepted_connections_have_nagle_off():
    async def go() -> int:
        (listener, *others) = _bind("127.0.0.1", 0, "HTTP")
        for other in others:
            other.close()
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def accepted(reader, writer) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(go()) != 0


def test_a_taken_port_is_a_clear_error(capsys):
    (first, *rest) = _bind("127.0.0.1", 0, "HTTP")
    try:
        with pytest.raises(typer.Exit):
            _bind("127.0.0.1", first.getsockname()[1], "HTTPS")
        assert "cannot listen for HTTPS on 127.0.0.1 port" in capsys.readouterr().err.replace("\n", " ")
    finally:
        for s in (first, *rest):
            s.close()
