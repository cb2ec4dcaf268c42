"""A thin async wrapper around the `runsc` command line.

Two rules from docs/gvisor-notes (measured on our machines) live here so nobody else has to know them:

* `runsc start` and `runsc restore` with `--network=sandbox` fail on kernels >= 6.11 with the runsc in
  Debian (google/gvisor#10704: it mistakes every netns for the root one because
  /proc/sys/net/core/rmem_default exists). We run those two commands in a private mount namespace in
  which /proc/sys/net is hidden under an empty tmpfs. The mask costs ~0 ms and only that CLI sees it.
* Detached runsc commands hand their stdout/stderr to the long-lived sandbox and gofer. If the caller
  reads them through pipes it waits forever, so detached commands always write to a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Hides /proc/sys/net from runsc so its "am I in the root netns?" probe gives the right answer.
_NET_SYSCTL_MASK = 'mount -t tmpfs -o size=4k,mode=555 corral-netmask /proc/sys/net && exec "$0" "$@"'


# (stream name, line without its end): where a streaming exec sends its output.
OutputSink = Callable[[str, str], None]


class RunscError(RuntimeError):
    """A runsc command failed; the message carries its exit code and the tail of its log."""


@dataclass(frozen=True)
class ContainerState:
    id: str
    status: str  # "created", "running", "paused", "stopped"
    pid: int


# runsc subcommands that are one-off command-line runs, as opposed to a sandbox's (`boot`) or gofer's.
_CLI_COMMANDS = frozenset({"create", "restore", "start", "run", "checkpoint", "pause", "resume", "delete", "kill",
                           "exec", "state", "events", "list", "ps"})


class Runsc:
    def __init__(self, binary: str, root: Path, platform: str = "systrap", *, network: str = "sandbox",
                 extra_flags: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.root = root
        # Flags that must be identical for checkpoint and restore (a mismatch fails silently).
        self.global_flags = [
            f"--root={root}",
            f"--platform={platform}",
            f"--network={network}",
            "--overlay2=none",  # the root filesystem is a host overlayfs owned by Corral (docs/runtime.md)
            "--cpu-num-from-quota",
            # Open TCP connections (incl. TIME_WAIT after serving a request) are dropped on checkpoint
            # instead of making the checkpoint fail.
            "--net-disconnect-ok",
            *extra_flags,
        ]

    def _argv(self, *args: str, mask_net_sysctl: bool = False) -> list[str]:
        argv = [self.binary, *self.global_flags, *args]
        if mask_net_sysctl:
            return ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", _NET_SYSCTL_MASK, *argv]
        return argv

    async def _run(self, *args: str, mask_net_sysctl: bool = False, log: Path | None = None,
                   timeout: float = 120.0) -> str:
        """Runs runsc to completion. With `log`, output goes to that file (never to a pipe)."""
        argv = self._argv(*args, mask_net_sysctl=mask_net_sysctl)
        if log is not None:
            with open(log, "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
            try:
                rc = await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise RunscError(f"runsc {args[0]} timed out after {timeout:.0f}s; log: {log_tail(log)}") from None
            if rc != 0:
                raise RunscError(f"runsc {args[0]} failed (exit {rc}): {log_tail(log)}")
            return ""
        try:
            rc, out, err = await _communicate(argv, timeout)
        except TimeoutError:
            raise RunscError(f"runsc {args[0]} timed out after {timeout:.0f}s") from None
        if rc != 0:
            msg = (err or out).decode(errors="replace").strip().splitlines()
            raise RunscError(f"runsc {args[0]} failed (exit {rc}): {' '.join(msg[-3:])}")
        return out.decode(errors="replace")

    async def create(self, cid: str, bundle: Path, log: Path) -> None:
        await self._run("create", f"--bundle={bundle}", cid, log=log)

    async def start(self, cid: str, log: Path) -> None:
        await self._run("start", cid, mask_net_sysctl=True, log=log)

    async def restore(self, cid: str, bundle: Path, image: Path, log: Path) -> None:
        await self._run("restore", "--detach", f"--bundle={bundle}", f"--image-path={image}", cid,
                        mask_net_sysctl=True, log=log)

    async def checkpoint(self, cid: str, image: Path, log: Path, *, leave_running: bool) -> None:
        args = ["checkpoint", "--compression=none", f"--image-path={image}"]
        if leave_running:
            args.append("--leave-running")
        await self._run(*args, cid, log=log, timeout=600)

    async def pause(self, cid: str) -> None:
        await self._run("pause", cid)

    async def resume(self, cid: str) -> None:
        await self._run("resume", cid)

    async def delete(self, cid: str) -> None:
        await self._run("delete", "--force", cid)

    async def kill(self, cid: str, signal: str = "KILL", *, all_processes: bool = True) -> None:
        await self._run("kill", *(["--all"] if all_processes else []), cid, signal)

    async def state(self, cid: str) -> ContainerState:
        data = json.loads(await self._run("state", cid))
        return ContainerState(id=data["id"], status=data["status"], pid=int(data.get("pid") or 0))

    def cli_processes(self) -> list[int]:
        """Pids of `runsc` commands (create, restore, ...; not sandboxes or gofers) working on this root.
        Called before anything of ours runs, they are left from a process that died: a `runsc create`
        goes on after its caller is killed and would add a container after the next one has looked."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue
            if not argv or os.path.basename(argv[0]) != os.path.basename(self.binary):
                continue
            if f"--root={self.root}" not in argv:
                continue
            command = next((a for a in argv[1:] if not a.startswith("-")), "")
            if command in _CLI_COMMANDS:
                found.append(int(entry))
        return found

    async def list_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        out = await self._run("list", "--quiet")
        return [line.strip() for line in out.splitlines() if line.strip()]

    async def events_stats(self, cid: str) -> dict:
        return json.loads(await self._run("events", "--stats", cid))

    async def exec(self, cid: str, process: Path, *, timeout: float = 60.0,
                   on_output: OutputSink | None = None) -> tuple[int, bytes, bytes]:
        """Runs the process described by an OCI process.json inside the sandbox, out of band. With
        `on_output`, each line of its output goes there as it comes (and not into the result)."""
        argv = self._argv("exec", f"--process={process}", cid)
        if on_output is None:
            return await _communicate(argv, timeout)
        return await _stream_lines(argv, timeout, on_output)

    async def version(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.binary, "--version", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return out.decode().splitlines()[0] if out else ""


async def _communicate(argv: list[str], timeout: float) -> tuple[int, bytes, bytes]:
    """Runs argv to its end: (exit code, stdout, stderr). TimeoutError after `timeout`, the process killed."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        await _abandon(proc)
        raise
    return proc.returncode or 0, out, err


async def _stream_lines(argv: list[str], timeout: float, on_output: OutputSink) -> tuple[int, bytes, bytes]:
    """Runs argv, sending its output line by line to `on_output`, until the process exits. Not until its
    pipes close: a command that leaves a process in the background (`daemon &`) hands it our pipes, and
    the sandbox keeps them open as long as that process lives."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def pump(stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                line = e.partial
            except asyncio.LimitOverrunError as e:  # a line past the reader's limit comes in pieces
                line = await stream.readexactly(e.consumed)
            if not line:
                return
            on_output(name, line.decode(errors="replace").rstrip("\r\n"))

    assert proc.stdout is not None and proc.stderr is not None
    pumps = [asyncio.create_task(pump(proc.stdout, "stdout")), asyncio.create_task(pump(proc.stderr, "stderr"))]
    try:
        async with asyncio.timeout(timeout):
            # No public event fires at the exit itself (only once the pipes close): poll the returncode.
            while proc.returncode is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await asyncio.wait(pumps, timeout=0.5)  # what was written before the exit
    finally:
        for task in pumps:
            task.cancel()
        await _abandon(proc)
    return proc.returncode or 0, b"", b""


async def _abandon(proc: asyncio.subprocess.Process) -> None:
    """Kills `proc` if it still runs and lets go of its pipes. asyncio (3.11) finishes a process, and
    `wait()` returns, only once its pipes are closed too, which a sandbox may never do (see above)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 5)


def log_tail(log: Path, lines: int = 4, sep: str = " | ") -> str:
    """The last lines of a runsc log, for error messages."""
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return sep.join(text[-lines:]) or "(empty log)"

