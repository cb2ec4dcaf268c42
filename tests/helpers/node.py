"""Runs the JS SDK scripts in tests/js with node, installing their npm dependencies on first use."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parent.parent / "js"
# The e2b JS SDKs declare `"node": ">=20.18.1 <21 || >=22"`; Debian 12's own nodejs is 18.
MIN_NODE = (20, 18, 1)


def node_version() -> tuple[int, ...]:
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(part) for part in out.strip().lstrip("v").split(".")[:3])


def ensure_node_modules() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed (scripts/install.sh installs them)")
    if node_version() < MIN_NODE:
        pytest.skip(f"the e2b JS SDK needs Node.js >= {'.'.join(map(str, MIN_NODE))}; this host has "
                    f"{'.'.join(map(str, node_version()))} (Debian 12 ships 18; install Node 20.18+ to run the "
                    "JS SDK tests)")
    lock = JS_DIR / "package-lock.json"
    stamp = JS_DIR / "node_modules" / ".corral-installed"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, capture_output=True,
                   timeout=600)
    stamp.touch()


def run_script(name: str, *args: str, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    ensure_node_modules()
    return subprocess.run(["node", str(JS_DIR / name), *args], cwd=JS_DIR, capture_output=True, text=True,
                          timeout=timeout, env=env)
