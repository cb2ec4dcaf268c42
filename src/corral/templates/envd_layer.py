"""The envd layer: our in-sandbox code (envd and the code interpreter) and its private dependencies, as a
read-only overlay layer.

Everything lives under /opt/corral/envd and runs with `python3 -I -S` plus an explicit path, so nothing
the sandbox's user installs, upgrades or removes with pip can shadow or break it, and `pip list`
inside the sandbox shows none of it. Cached in `<cache>/envd/<key>/`, keyed by the code and pins.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
from pathlib import Path

import corral.envd
import corral.interpreter
from corral.templates.cachelock import cache_lock

PREFIX = "opt/corral/envd"
# Exact pins, installed without dependency resolution so the layer is reproducible.
REQUIREMENTS = (
    "anyio==4.16.0", "click==8.5.1", "connectrpc==0.12.1", "h11==0.16.0", "httptools==0.9.0",
    "idna==3.20", "inotify-simple==2.0.1", "protobuf-py==0.6.0", "protobuf-py-ext==0.6.0",
    "python-multipart==0.0.34", "starlette==1.10.0", "typing-extensions==4.16.0", "uvicorn==0.54.0",
)
# The code interpreter's own (it drives kernels; the kernels live in the user's environment). Resolved by
# pip from these pins (binary wheels only), since jupyter_client brings a handful of dependencies.
INTERPRETER_REQUIREMENTS = ("jupyter_client==8.10.0", "pyzmq==27.3.0", "httpx==0.28.1")
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

START_COMMAND = ("/usr/bin/python3", "-I", "-S", f"/{PREFIX}/envd.py", "--oom-guard")
INTERPRETER_COMMAND = ("/usr/bin/python3", "-I", "-S", f"/{PREFIX}/interpreter.py")
PACKAGES = (corral.envd, corral.interpreter)


def _sources() -> list[tuple[Path, Path]]:
    """(file, its path relative to the `corral` package) for all in-sandbox code."""
    out = []
    for package in PACKAGES:
        root = Path(package.__file__).parent
        out += [(p, p.relative_to(root.parent)) for p in sorted(root.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts]
    return out


def layer_key() -> str:
    digest = hashlib.sha256(repr((REQUIREMENTS, INTERPRETER_REQUIREMENTS, TARGET_PYTHON, LAUNCHER)).encode())
    for path, relative in _sources():
        digest.update(str(relative).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def host_pip_install_args() -> list[str]:
    """The host's pip, installing binary wheels for the sandbox's Python."""
    version, abi, platforms = TARGET_PYTHON
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--only-binary=:all:",
            "--python-version", version, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
            *(arg for p in platforms for arg in ("--platform", p))]


async def ensure_envd_layer(cache_dir: Path, log_path: Path | None = None) -> Path:
    key = layer_key()
    target = cache_dir / "envd" / key
    if target.is_dir():
        return target
    async with cache_lock(cache_dir / "locks" / f"envd-{key}.lock"):
        if not target.is_dir():  # made by another process meanwhile
            await _make_envd_layer(target, key)
    return target


async def _make_envd_layer(target: Path, key: str) -> None:
    partial = target.with_name(f".{key}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    home = partial / PREFIX
    lib = home / "lib"
    version, abi, platforms = TARGET_PYTHON
    target_args = ["--only-binary=:all:", "--python-version", version, "--implementation", "cp", "--abi", abi,
                   "--abi", "abi3", "--abi", "none", *(arg for p in platforms for arg in ("--platform", p))]
    await _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", *target_args,
                "--target", str(lib), *REQUIREMENTS])
    await _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--upgrade", *target_args,
                "--target", str(lib), *INTERPRETER_REQUIREMENTS])
    package = lib / "corral"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text('"""Corral\'s in-sandbox code."""\n')
    for path, relative in _sources():
        dest = lib / "corral" / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (home / "envd.py").write_text(LAUNCHER)
    (home / "interpreter.py").write_text(LAUNCHER.replace("envd", "the code interpreter", 1)
                                         .replace("corral.envd.__main__", "corral.interpreter.__main__"))
    # Byte-compile now: the layer is read-only in sandboxes and startup should not parse sources.
    await _run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(lib)])
    for path in partial.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:5])} …` failed ({proc.returncode}): {out.decode()[-2000:]}")
