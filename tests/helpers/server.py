"""A real `corral serve` in a subprocess, on its own instance tag, network and data directory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

CLI = [sys.executable, "-c", "from corral.cli.main import app; app()"]


def host_resolver() -> str:
    """The host's first DNS resolver, as sandboxes' upstream."""
    from corral.network.dns import upstream_resolvers

    return str(upstream_resolvers()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, instance: str, network: str, root: Path, *, dns_upstream: str, pool_size: int = 2,
                 host: str = "127.0.0.1", domain: str = "sandbox.test", https_port: int | None = 0,
                 extra_env: dict[str, str] | None = None, log_level: str = "warning") -> None:
        """`https_port`: 0 serves plain HTTP only (every test server at once can run); 443 serves the
        domain over HTTPS as a user's server does, for one test module at a time; None leaves the option out,
        as a user's first `corral serve` does."""
        self.port = free_port()
        self.domain = domain
        self.https_port = https_port
        self.host = host
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CORRAL_INSTANCE": instance, "CORRAL_SANDBOX_NETWORK": network,
                    "CORRAL_DATA_DIR": str(root / "data"), "CORRAL_RUN_DIR": f"/run/corral-test-{instance}",
                    "CORRAL_DNS_UPSTREAM": dns_upstream, "CORRAL_POOL_SIZE": str(pool_size),
                    "CORRAL_METRICS_INTERVAL_S": "1", **(extra_env or {})}
        self.env.pop("E2B_DEBUG", None)
        self.log = root / "serve.log"
        self.log_level = log_level
        self.process: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        return subprocess.run([*CLI, *args], env=self.env, check=True, capture_output=True, text=True).stdout

    def start(self, wait_pool: int = 0) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            argv = [*CLI, "serve", "--host", self.host, "--port", str(self.port), "--log-level", self.log_level,
                    "--domain", self.domain]
            if self.https_port is not None:
                argv += ["--https-port", str(self.https_port)]
            self.process = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"corral serve exited: {self.log.read_text()[-3000:]}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=2).json()
                if health.get("pooled", {}).get("base", 0) >= wait_pool:
                    return self
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"corral serve did not come up: {self.log.read_text()[-3000:]}")

    @contextlib.contextmanager
    def serving(self, wait_pool: int = 0, keep_log: Path | None = None) -> Iterator[ServerProcess]:
        """Started for the block (a test module's fixture), then stopped and everything it left destroyed."""
        self.start(wait_pool=wait_pool)
        try:
            yield self
        finally:
            self.stop()
            self.destroy_everything(keep_log=keep_log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.process = None

    def destroy_everything(self, keep_log: Path | None = None) -> None:
        """After stop(): destroys whatever sandboxes, netns and mounts the server left and removes its
        directory (copying its log to `keep_log` first, for a look after a failed run)."""
        import asyncio
        import ipaddress
        import shutil

        from corral.config import Settings
        from corral.runtime.gvisor import GVisorRuntime
        from corral.storage.disk import mounts_under

        settings = Settings(data_dir=Path(self.env["CORRAL_DATA_DIR"]), run_dir=Path(self.env["CORRAL_RUN_DIR"]),
                            sandbox_network=ipaddress.IPv4Network(self.env["CORRAL_SANDBOX_NETWORK"]),
                            instance=self.env["CORRAL_INSTANCE"])

        async def run() -> None:
            runtime = GVisorRuntime(settings)
            await runtime.open()
            await runtime.destroy_all()

        asyncio.run(run())
        # Volumes stay mounted when the server stops (a restarted server finds them): unmount them before
        # their directory is removed.
        for mountpoint in mounts_under(settings.data_dir):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        if keep_log is not None and self.log.exists():
            shutil.copy(self.log, keep_log)
        shutil.rmtree(self.log.parent, ignore_errors=True)

    def sdk_env(self, key: str) -> dict[str, str]:
        return {"E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url, "E2B_API_KEY": key}
