"""envd driven by the unmodified e2b JS SDK (npm), run with node against a real sandbox."""

from __future__ import annotations

import secrets

from corral.runtime.base import SandboxConfig
from tests.helpers.envd_client import init
from tests.helpers.node import run_script


def test_js_sdk_commands_pty_files_and_watch(harness, runtime):
    sb = harness.run(runtime.create("base", SandboxConfig()))
    try:
        url = f"http://{sb.address}:49983"
        token = secrets.token_hex(16)
        assert init(url, accessToken=token, defaultUser="user").status_code == 204
        result = run_script("envd.mjs", url, token)
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        checks = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
        assert checks == ["ok run", "ok background, stdin and kill", "ok pty", "ok files", "ok watch",
                          "ok wrong token"]
    finally:
        harness.run(runtime.destroy(sb.id))
