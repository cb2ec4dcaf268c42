"""The SDK's own debug mode (E2B_DEBUG=true: no control plane, envd at localhost:49983) against an envd
running on the host, as E2B's SDK test-suites run against a local envd."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

PORT = 49983


@pytest.fixture
def host_envd(tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.skip(f"port {PORT} is already in use on this host; debug mode needs exactly that port")
    server = subprocess.Popen([sys.executable, "-m", "corral.envd", "--host", "127.0.0.1", "--port", str(PORT),
                               "--workdir", str(tmp_path)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=1).status_code == 204:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield tmp_path
    finally:
        server.terminate()
        assert server.wait(10) is not None


def test_debug_mode_sdk_against_host_envd(host_envd, monkeypatch):
    monkeypatch.setenv("E2B_DEBUG", "true")
    from e2b import Sandbox

    sbx = Sandbox.create()
    assert sbx.commands.run("pwd").stdout == f"{host_envd}\n"
    sbx.files.write(str(host_envd / "d.txt"), "debug")
    assert (host_envd / "d.txt").read_text() == "debug"
    assert sbx.files.read(str(host_envd / "d.txt")) == "debug"
    assert sbx.is_running()
