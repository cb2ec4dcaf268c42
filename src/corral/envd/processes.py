"""Processes envd runs for clients: spawning, output fan-out, stdin, PTYs, signals and exit records."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from corral.envd.spawner import SpawnerGone, Spawners
from corral.envd.users import User

STD_CHUNK = 32 * 1024
PTY_CHUNK = 16 * 1024
# How long an exited process can still be reached with Connect.
EXITED_RETENTION_S = 30.0
# After the main process exits, how long to wait for descendants that still hold its output open
# (e.g. `server &`) before reporting the end; their later output is not collected.
OUTPUT_DRAIN_S = 0.25
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ProcessNotFound(LookupError):
    pass


class InvalidProcessRequest(ValueError):
    pass


@dataclass
class Output:
    """One event for subscribers: `kind` is stdout, stderr, pty or end."""

    kind: str
    data: bytes = b""


@dataclass
class Exit:
    exit_code: int
    exited: bool
    status: str
    error: str | None


@dataclass
class Spec:
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None
    stdin: bool
    pty_size: tuple[int, int] | None  # (cols, rows)


@dataclass
class ManagedProcess:
    pid: int
    spec: Spec
    pty_master: int | None
    stdin_writer: int | None  # fd of the stdin pipe's write end
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    exit: Exit | None = None
    exited_at: float = 0.0
    expired: bool = False  # killed because its Start deadline passed

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)

    def publish(self, item: Output | Exit) -> None:
        for queue in self.subscribers:
            queue.put_nowait(item)


def go_status(returncode: int) -> Exit:
    """The end event E2B's Go envd reports for a wait status (`exit status 3`, `signal: killed`)."""
    if returncode >= 0:
        status = f"exit status {returncode}"
        return Exit(exit_code=returncode, exited=True, status=status, error=status if returncode else None)
    signame = signal.strsignal(-returncode) or f"signal {-returncode}"
    status = f"signal: {signame.lower()}"
    return Exit(exit_code=-1, exited=False, status=status, error=status)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _become_controlling_tty() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ProcessTable:
    """All processes started through envd, running and recently exited."""

    def __init__(self, sandbox_env: Callable[[], dict[str, str]]) -> None:
        self._sandbox_env = sandbox_env
        self._running: dict[int, ManagedProcess] = {}
        self._exited: dict[int, ManagedProcess] = {}
        self._supervisors: set[asyncio.Task] = set()  # held so the loop does not drop them
        self._spawners = Spawners()

    @property
    def spawners(self) -> Spawners:
        """The per-user spawners, shared with the sudo service (it starts sudo from root's)."""
        return self._spawners

    # --- lookups ---------------------------------------------------------------------------------

    def running(self) -> list[ManagedProcess]:
        return list(self._running.values())

    def find(self, pid: int | None = None, tag: str | None = None, *, include_exited: bool = False
             ) -> ManagedProcess:
        self._forget_old()
        pools = [self._running] + ([self._exited] if include_exited else [])
        for pool in pools:
            if pid is not None and pid in pool:
                return pool[pid]
            if tag is not None:
                for proc in pool.values():
                    if proc.spec.tag == tag:
                        return proc
        what = f"pid {pid}" if pid is not None else f"tag {tag}"
        raise ProcessNotFound(f"process with {what} not found")

    def _forget_old(self) -> None:
        horizon = time.monotonic() - EXITED_RETENTION_S
        for pid in [pid for pid, p in self._exited.items() if p.exited_at < horizon]:
            del self._exited[pid]

    # --- spawning --------------------------------------------------------------------------------

    def environment(self, user: User, request_envs: dict[str, str]) -> dict[str, str]:
        """Process env < sandbox env vars < request envs."""
        env = {"PATH": DEFAULT_PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
        env.update(self._sandbox_env())
        env.update(request_envs)
        return env

    async def spawn(self, spec: Spec, user: User, cwd: str) -> tuple[ManagedProcess, asyncio.Queue]:
        """Start the process and return it with a subscription that sees all of its output."""
        env = self.environment(user, spec.envs)
        identity = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        if os.geteuid() != 0:
            identity = {}  # an unprivileged envd (development) can only run as itself
        child_fds: list[int] = []
        outputs: list[tuple[int, str, int]] = []  # (fd, kind, chunk size) envd reads
        stdin_writer = None
        try:
            if spec.pty_size is not None:
                master, slave = os.openpty()
                outputs.append((master, "pty", PTY_CHUNK))
                child_fds.append(slave)
                _set_winsize(master, *spec.pty_size)
                stdio = {"stdin": slave, "stdout": slave, "stderr": slave,
                         "preexec_fn": _become_controlling_tty}
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                outputs += [(out_r, "stdout", STD_CHUNK), (err_r, "stderr", STD_CHUNK)]
                child_fds += [out_w, err_w]
                if spec.stdin:
                    stdin, stdin_writer = os.pipe()
                else:
                    stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                child_fds.append(stdin)
                stdio = {"stdin": stdin, "stdout": out_w, "stderr": err_w}
            exited = await self._start(spec, user, env, cwd, stdio, identity)
        except BaseException:
            for fd in [fd for fd, _, _ in outputs] + ([stdin_writer] if stdin_writer is not None else []):
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        master = outputs[0][0] if spec.pty_size is not None else None
        pid, waiter = exited
        proc = ManagedProcess(pid=pid, spec=spec, pty_master=master, stdin_writer=stdin_writer)
        queue = proc.subscribe()
        readers = [self._attach_reader(proc, fd, kind, size) for fd, kind, size in outputs]
        self._running[proc.pid] = proc
        task = asyncio.get_running_loop().create_task(
            self._supervise(proc, waiter, readers, [fd for fd, _, _ in outputs]))
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        return proc, queue

    async def _start(self, spec: Spec, user: User, env: dict[str, str], cwd: str, stdio: dict,
                     identity: dict) -> tuple[int, Awaitable[int]]:
        """Starts the command; returns its pid and an awaitable of its return code."""
        spawner = self._spawners.for_user(user) if "preexec_fn" not in stdio else None
        if spawner is not None:
            try:
                pid = await spawner.spawn([spec.cmd, *spec.args], env, cwd,
                                          [stdio["stdin"], stdio["stdout"], stdio["stderr"]])
                return pid, spawner.wait(pid)
            except SpawnerGone:
                pass  # replaced on the next command; this one forks as before
        child = await asyncio.create_subprocess_exec(
            spec.cmd, *spec.args, env=env, cwd=cwd, start_new_session=True, **stdio, **identity)
        return child.pid, child.wait()

    @staticmethod
    def _attach_reader(proc: ManagedProcess, fd: int, kind: str, size: int) -> asyncio.Future:
        """Publish what arrives on `fd` until EOF; the returned future completes at EOF."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                chunk = os.read(fd, size)
            except BlockingIOError:
                return
            except OSError:  # EIO on a PTY: every holder of the terminal has gone
                chunk = b""
            if chunk:
                proc.publish(Output(kind, chunk))
                return
            loop.remove_reader(fd)
            if not finished.done():
                finished.set_result(None)

        loop.add_reader(fd, readable)
        return finished

    async def _supervise(self, proc: ManagedProcess, waiter: Awaitable[int],
                         readers: list[asyncio.Future], fds: list[int]) -> None:
        returncode = await waiter
        await asyncio.wait(readers, timeout=OUTPUT_DRAIN_S)
        loop = asyncio.get_running_loop()
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)
        self._close_stdin(proc)
        proc.exit = go_status(returncode)
        proc.exited_at = time.monotonic()
        self._running.pop(proc.pid, None)
        self._exited[proc.pid] = proc
        proc.publish(proc.exit)

    # --- input and control -----------------------------------------------------------------------

    def write_input(self, proc: ManagedProcess, stdin: bytes | None, pty: bytes | None) -> None:
        if pty is not None:
            if proc.pty_master is None:
                raise InvalidProcessRequest("process has no pty")
            _write_all(proc.pty_master, pty)
        elif stdin is not None:
            if proc.pty_master is not None:
                # A PTY process reads its terminal; stdin bytes go there as typed input.
                _write_all(proc.pty_master, stdin)
                return
            if proc.stdin_writer is None:
                raise InvalidProcessRequest("stdin is not enabled for this process")
            try:
                _write_all(proc.stdin_writer, stdin)
            except BrokenPipeError:
                raise InvalidProcessRequest("process has closed its stdin") from None

    def close_stdin(self, proc: ManagedProcess) -> None:
        if proc.pty_master is not None:
            raise InvalidProcessRequest("cannot close stdin of a PTY process; send Ctrl-D (0x04) instead")
        if proc.stdin_writer is None:
            raise InvalidProcessRequest("stdin is not enabled for this process")
        self._close_stdin(proc)

    @staticmethod
    def _close_stdin(proc: ManagedProcess) -> None:
        if proc.stdin_writer is not None:
            os.close(proc.stdin_writer)
            proc.stdin_writer = None

    def resize(self, proc: ManagedProcess, cols: int, rows: int) -> None:
        if proc.pty_master is None:
            raise InvalidProcessRequest("process has no pty")
        _set_winsize(proc.pty_master, cols, rows)

    def signal(self, proc: ManagedProcess, signum: int) -> None:
        """Signal the process and everything it started (its session's process group)."""
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    def kill_all(self) -> None:
        for proc in self.running():
            self.signal(proc, signal.SIGKILL)
        self._spawners.close()

    def prepare_user(self, user: User) -> None:
        """Gives the user (the sandbox's default one) a resident spawner, started now."""
        self._spawners.prepare(user)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.001)  # a full PTY buffer drains quickly; input chunks are small
            continue
        view = view[written:]
