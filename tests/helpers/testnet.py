"""Test hosts in network namespaces the tests create themselves: stand-ins for 'a private LAN host' and
'a host on the internet', so no test traffic ever leaves this machine."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@dataclass
class TestHost:
    __test__ = False  # not a test class, despite the name
    """A netns `ctest-<name>` with `address`/24 on eth0, reachable from the host through a veth whose host
    end has `.254` of the same /24."""

    name: str
    address: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"ctest-{self.name}"

    @property
    def host_if(self) -> str:
        return f"ctv{self.name}"

    @property
    def gateway(self) -> str:
        return self.address.rsplit(".", 1)[0] + ".254"

    def up(self) -> TestHost:
        self.down()
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        sh("ip", "-n", self.netns, "route", "add", "default", "via", self.gateway)
        return self

    def serve_http(self, port: int) -> None:
        helper = Path(__file__).with_name("http_responder.py")
        self._spawn([sys.executable, str(helper), self.address, str(port), f"hello from {self.name}"])
        self._wait_port(port)

    def serve_https(self, port: int, cert_dir: Path) -> None:
        """The HTTP responder's body over TLS (a certificate nobody verifies)."""
        helper = Path(__file__).with_name("https_responder.py")
        self._spawn([sys.executable, str(helper), self.address, str(port), f"hello from {self.name} over TLS",
                     str(cert_dir)])
        self._wait_port(port)

    def serve_files(self, port: int, directory: Path) -> None:
        helper = Path(__file__).with_name("file_responder.py")
        self._spawn([sys.executable, str(helper), self.address, str(port), str(directory)])
        self._wait_port(port)

    def serve_dns(self, answer: str) -> None:
        helper = Path(__file__).with_name("dns_responder.py")
        self._spawn([sys.executable, str(helper), self.address, answer])
        time.sleep(0.5)

    def _spawn(self, argv: list[str]) -> None:
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.netns, *argv],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def _wait_port(self, port: int) -> None:
        for _ in range(100):
            probe = sh("ip", "netns", "exec", self.netns, "bash", "-c",
                       f"echo > /dev/tcp/{self.address}/{port}", check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"test host {self.name} did not start listening on {port}")

    def down(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()
        sh("ip", "netns", "del", self.netns, check=False)
        sh("ip", "link", "del", self.host_if, check=False)
