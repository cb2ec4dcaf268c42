"""A sandbox's logs, as E2B's `GET /sandboxes/{id}/logs` gives them: what envd and the template's start
command printed.

Two sources, each read whole (its last MiB) on every request, nothing stored on the side:
- `runtime`: the console of the sandbox's init (envd and what it started without a log of its own) and
  the runtime's messages about the sandbox (runsc.log for gVisor). Host paths in it are described, not
  named (control/errors.py). A resumed sandbox runs in a new container: its log starts anew.
- `start`: the start command's log of a user-built template, /var/log/corral/start.log in the sandbox.

Neither source timestamps its lines, so every line carries the time its source was last written: the
line is at most that recent. A paused sandbox has no running container and no logs."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from corral.control.errors import HostPaths
from corral.orchestrator.sandboxes import Orchestrator
from corral.runtime.base import RuntimeError_
from corral.templates.builder import START_LOG

MAX_BYTES = 1 << 20  # per source
# Two lines of shell: the log's modification time, then its last MAX_BYTES (nothing when there is none).
_READ_START_LOG = (f'f={START_LOG}; [ -f "$f" ] || exit 3; stat -c %Y "$f"; '
                   f'tail -c {MAX_BYTES} "$f"')
_LEVELS = [(re.compile(r"^(E\d{4} |ERROR\b|CRITICAL\b|Traceback\b|\S*Error:)"), "error"),
           (re.compile(r"^(W\d{4} |WARNING\b|WARN\b)"), "warn"),
           (re.compile(r"^(D\d{4} |DEBUG\b)"), "debug")]


@dataclass(frozen=True)
class LogLine:
    timestamp: float  # seconds since the epoch: when its source was last written
    line: str
    level: str  # debug, info, warn, error: guessed from the line's prefix
    source: str  # "runtime" or "start"
    number: int  # 1-based, within its source as read now


def level_of(line: str) -> str:
    for pattern, level in _LEVELS:
        if pattern.match(line):
            return level
    return "info"


def _lines(data: bytes, mtime: float, source: str, hide=None) -> list[LogLine]:
    text = data.decode(errors="replace")
    return [LogLine(mtime, hide(line) if hide else line, level_of(line), source, number)
            for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


async def read_sandbox_logs(orchestrator: Orchestrator, sandbox_id: str, paths: HostPaths | None = None
                            ) -> list[LogLine]:
    """The running sandbox's log lines, the runtime's first, then the start command's; [] when it does not
    run here (paused, or starting)."""
    runtime_id = orchestrator.runtime_id(sandbox_id)
    if runtime_id is None or await orchestrator.reachable_address(sandbox_id) is None:
        return []
    runtime = orchestrator.runtime
    try:
        data, mtime = await asyncio.to_thread(runtime.output, runtime_id, MAX_BYTES)
    except RuntimeError_:
        return []  # gone meanwhile
    lines = _lines(data, mtime, "runtime", (paths or HostPaths()).hide) if mtime is not None else []
    try:
        with orchestrator.in_use(sandbox_id):  # thawed while the command runs in it
            result = await runtime.exec(runtime_id, ["/bin/sh", "-c", _READ_START_LOG], timeout=10)
    except RuntimeError_:
        return lines
    if result.exit_code == 0:
        stamp, _, data = result.stdout.partition(b"\n")
        if stamp.strip().isdigit():
            lines += _lines(data, float(stamp), "start")
    return lines


def since(lines: list[LogLine], start_ms: int | None) -> list[LogLine]:
    return lines if start_ms is None else [entry for entry in lines if entry.timestamp * 1000 >= start_ms]
