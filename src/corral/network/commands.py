"""Runs `ip` and `nft` with their input on stdin, one process per batch of changes."""

from __future__ import annotations

import asyncio
import subprocess


class NetworkError(RuntimeError):
    pass


async def run(argv: list[str], stdin: str | None = None, *, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


def run_sync(argv: list[str], stdin: str | None = None, *, check: bool = True) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout
