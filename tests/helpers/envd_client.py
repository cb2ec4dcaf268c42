"""Official E2B SDK clients pointed straight at an envd (no control plane), the way `Sandbox.create`
wires them after the API answered: sandbox URL, access token and routing headers."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from e2b import AsyncSandbox, ConnectionConfig, Sandbox
from packaging.version import Version

from corral.envd import ENVD_VERSION
from corral.runtime.base import SandboxConfig

FAKE_API_KEY = "e2b_" + "0" * 40


def _opts(url: str, token: str | None, sandbox_id: str) -> dict:
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
    if token is not None:
        headers["X-Access-Token"] = token
    return dict(sandbox_id=sandbox_id, envd_version=Version(ENVD_VERSION), envd_access_token=token,
                sandbox_domain=None,
                connection_config=ConnectionConfig(sandbox_url=url, api_key=FAKE_API_KEY,
                                                   extra_sandbox_headers=headers))


def sync_client(url: str, token: str | None, sandbox_id: str = "envd-test") -> Sandbox:
    return Sandbox(**_opts(url, token, sandbox_id))


def async_client(url: str, token: str | None, sandbox_id: str = "envd-test") -> AsyncSandbox:
    return AsyncSandbox(**_opts(url, token, sandbox_id))


def init(url: str, current_token: str | None = None, **body) -> httpx.Response:
    headers = {"X-Access-Token": current_token} if current_token else {}
    return httpx.post(f"{url}/init", json=body, headers=headers, timeout=10)


@dataclass
class EnvdSandbox:
    sandbox_id: str
    url: str
    token: str


@contextlib.contextmanager
def envd_sandbox(harness, runtime, template: str = "base", **init_body) -> Iterator[EnvdSandbox]:
    """A sandbox straight from the runtime, handed over with its own access token and `init_body` (the
    rest of /init), as the control plane would; destroyed on exit."""
    sb = harness.run(runtime.create(template, SandboxConfig()))
    try:
        url = f"http://{sb.address}:49983"
        token = secrets.token_hex(16)
        response = init(url, accessToken=token, **init_body)
        assert response.status_code == 204, response.text
        yield EnvdSandbox(sb.id, url, token)
    finally:
        harness.run(runtime.destroy(sb.id))
