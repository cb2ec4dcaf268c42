"""The envd layer: our in-sandbox daemon and its private dependencies, as a read-only overlay layer.

Everything lives under /opt/corral/envd and runs with `python3 -I -S` plus an explicit path, so nothing
the sandbox's user installs, upgrades or removes with pip can shadow or break envd, and `pip list`
inside the sandbox shows none of it. Cached in `<cache>/envd/<key>/`, keyed by the code and pins.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
from pathlib import Path

import corral.envd

PREFIX = "opt/corral/envd"
# Exact pins, installed without dependency resolution so the layer is reproducible.
REQUIREMENTS = (
    "anyio==4.16.0", "click==8.5.1", "connectrpc==0.12.1", "h11==0.16.0", "httptools==0.9.0",
    "idna==3.20", "inotify-simple==2.0.1", "protobuf-py==0.6.0", "protobuf-py-ext==0.6.0",
    "python-multipart==0.0.34", "starlette==1.10.0", "typing-extensions==4.16.0", "uvicorn==0.54.0",
)
# The sandbox's interpreter (Debian bookworm's python3).
TARGET_PYTHON = ("3.11", "cp311", ("manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64"))

LAUNCHER = '''\
"""Start envd with only its own libraries on the path (run with python3 -I -S)."""
import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")]
from corral.envd.__main__ import main

main()
'''

START_COMMAND = ("/usr/bin/python3", "-I", "-S", f"/{PREFIX}/envd.py")


def _sources() -> list[Path]:
    root = Path(corral.envd.__file__).parent
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def layer_key() -> str:
    digest = hashlib.sha256(repr((REQUIREMENTS, TARGET_PYTHON, LAUNCHER)).encode())
    root = Path(corral.envd.__file__).parent
    for path in _sources():
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


async def ensure_envd_layer(cache_dir: Path, log_path: Path | None = None) -> Path:
    key = layer_key()
    target = cache_dir / "envd" / key
    if target.is_dir():
        return target
    partial = target.with_name(f".{key}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    home = partial / PREFIX
    lib = home / "lib"
    version, abi, platforms = TARGET_PYTHON
    await _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                "--only-binary=:all:", "--python-version", version, "--implementation", "cp", "--abi", abi,
                *(arg for p in platforms for arg in ("--platform", p)), "--target", str(lib), *REQUIREMENTS])
    package = lib / "corral"
    package.mkdir()
    (package / "__init__.py").write_text('"""Corral\'s in-sandbox code."""\n')
    source_root = Path(corral.envd.__file__).parent
    for path in _sources():
        dest = package / "envd" / path.relative_to(source_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (home / "envd.py").write_text(LAUNCHER)
    # Byte-compile now: the layer is read-only in sandboxes and startup should not parse sources.
    await _run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(lib)])
    for path in partial.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:5])} …` failed ({proc.returncode}): {out.decode()[-2000:]}")
