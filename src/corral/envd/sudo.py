"""envd's sudo service: runs Debian's sudo as root for sandbox users whom sudoers lets do anything.

gVisor (as of the runsc we run) ignores set-user-ID bits and reports no_new_privs as always set, so the
setuid `sudo` binary cannot raise a user's privileges on its own (it stops with "The no new privileges
flag is set"). The template replaces `/usr/bin/sudo` with a small client (`sudo_client.py`); for a
non-root caller it connects to this service, which checks the caller's rights and starts the real sudo
(diverted to /usr/libexec/corral/sudo) as root with the caller's arguments, environment, working
directory and standard streams. The caller's identity is what the kernel attaches to its request
(SCM_CREDENTIALS with SO_PASSCRED; gVisor's SO_PEERCRED reports the asking process itself, so it cannot
be used), never what the request says. The service greets each client with its own credentials, so the
client can tell that root answers before it hands over its streams.

Who may: a user with a sudoers rule that allows every command without a password (`user` in the base
image: `NOPASSWD: ALL`), as sudo itself lists it (`sudo -ll -U <name>`). envd has no terminal to ask for
a password on, so rules that need one are refused, as sudo would for an account with no password set.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import struct

from corral.envd.spawner import SpawnerGone, Spawners
from corral.envd.users import UnknownUser, lookup

log = logging.getLogger("corral.envd.sudo")

# An abstract socket: nothing on disk to restore or to squat, reachable from the whole sandbox. The
# client checks that whoever listens is root.
ADDRESS = "\0corral-envd-sudo"
REAL_SUDO_DIR = "/usr/libexec/corral"
_MAX_REQUEST = 1 << 20  # argv and environment
_STREAMS = 3
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
# A caller that goes away (killed with its command) takes its sudo with it: TERM first, which sudo passes
# on to the command it runs, then KILL.
_KILL_GRACE_S = 5.0
_POLICY_FILES = ("/etc/sudoers", "/etc/sudoers.d", "/etc/passwd", "/etc/group")


class SudoRefused(Exception):
    pass


class SudoService:
    def __init__(self, spawners: Spawners, address: str = ADDRESS) -> None:
        self._spawners = spawners
        self._address = address
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._granted: dict[int, tuple[tuple, bool]] = {}  # uid -> (policy files' stamp, may use sudo)

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        listener.bind(self._address)
        listener.listen(64)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for task in self._tasks:
            task.cancel()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.sendmsg([json.dumps({"hello": 1}).encode()],
                          [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _CREDENTIALS.pack(os.getpid(), 0, 0))])
            data, fds, (pid, uid, _) = await _receive(conn)
            try:
                request = json.loads(data)
                argv, env, cwd = request["argv"], request["env"], request["cwd"]
                if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
                        and isinstance(env, dict) and isinstance(cwd, str) and len(fds) == _STREAMS):
                    raise ValueError("bad request")
                name = _user_name(uid)
                if not await self._may_sudo(uid, name):
                    raise SudoRefused(f"{name} may not run commands as root without a password, and envd "
                                      "cannot ask for one (a sudoers rule with NOPASSWD: ALL is needed)")
                real = os.path.join(REAL_SUDO_DIR, "sudoedit" if os.path.basename(argv[0]) == "sudoedit"
                                    else "sudo")
                if not os.path.exists(real):
                    raise SudoRefused(f"{real} is missing: this template does not route sudo through envd")
                spawner = self._root_spawner()
                child = await spawner.spawn([real, *argv[1:]], {str(k): str(v) for k, v in env.items()},
                                            cwd if os.path.isdir(cwd) else "/", fds)
                exited = spawner.wait(child)
            except SudoRefused as e:
                await _send(conn, {"error": str(e)})
                return
            except (ValueError, KeyError, TypeError):
                await _send(conn, {"error": "envd could not read the request"})
                return
            except (OSError, SpawnerGone) as e:
                await _send(conn, {"error": f"envd could not start sudo: {e}"})
                return
            finally:
                for fd in fds:
                    os.close(fd)
                fds = []
            log.info("sudo for %s (pid %d): %s", name, pid, " ".join(argv[1:])[:200])
            returncode = await self._follow(conn, child, exited)
            if returncode is not None:
                await _send(conn, {"exit": returncode})
        except (ConnectionError, OSError):
            pass  # the client went away; _follow has stopped its sudo
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    async def _follow(self, conn: socket.socket, pid: int, exited: asyncio.Future) -> int | None:
        """Passes the client's signals on until sudo exits; stops sudo if the client goes away."""
        while not exited.done():
            await _wait_readable(conn, until=exited)
            if exited.done():
                break
            try:
                message = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                message = b""
            if not message:
                await self._stop(pid, exited)
                return None
            with contextlib.suppress(ValueError, KeyError, TypeError, ProcessLookupError, PermissionError):
                signum = int(json.loads(message)["signal"])
                if signum in _FORWARDED:
                    os.kill(pid, signum)
        return exited.result()

    @staticmethod
    async def _stop(pid: int, exited: asyncio.Future) -> None:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), _KILL_GRACE_S)
                return

    def _root_spawner(self):
        spawner = self._spawners.for_user(lookup("root"))
        if spawner is None:
            raise SudoRefused("envd is not running as root")
        return spawner

    async def _may_sudo(self, uid: int, name: str) -> bool:
        if uid == 0:
            return True
        stamp = _policy_stamp()
        cached = self._granted.get(uid)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        listing = await self._run_as_root([os.path.join(REAL_SUDO_DIR, "sudo"), "-ll", "-U", name])
        granted = allows_everything_without_password(listing)
        self._granted[uid] = (stamp, granted)
        return granted

    async def _run_as_root(self, argv: list[str]) -> str:
        spawner = self._root_spawner()
        read_end, write_end = os.pipe()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            pid = await spawner.spawn(argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}, "/",
                                      [null, write_end, null])
            exited = spawner.wait(pid)  # now: the spawner forgets a pid once its exit is delivered
        finally:
            os.close(write_end)
            os.close(null)
        try:
            with os.fdopen(read_end, "rb") as out:
                output = await asyncio.to_thread(out.read)
        finally:
            await exited
        return output.decode(errors="replace")


_FORWARDED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                        signal.SIGUSR2, signal.SIGALRM})


def allows_everything_without_password(listing: str) -> bool:
    """Whether `sudo -ll -U <user>` shows a rule for every command that needs no authentication."""
    defaults, _, rules = listing.partition("Sudoers entry:")
    no_password_by_default = "!authenticate" in defaults
    for entry in ("Sudoers entry:" + rules).split("Sudoers entry:")[1:]:
        options, _, commands = entry.partition("Commands:")
        option_line = next((line for line in options.splitlines() if line.strip().startswith("Options:")), "")
        no_password = "!authenticate" in option_line or (no_password_by_default and
                                                         "authenticate" not in option_line)
        if no_password and any(line.strip() == "ALL" for line in commands.splitlines()):
            return True
    return False


def _policy_stamp() -> tuple:
    stamps = []
    for path in _POLICY_FILES:
        try:
            st = os.stat(path)
            stamps.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((path, None))
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir("/etc/sudoers.d"), key=lambda e: e.name):
            st = entry.stat()
            stamps.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _user_name(uid: int) -> str:
    try:
        return lookup(pwd.getpwuid(uid).pw_name).name
    except (KeyError, UnknownUser):
        raise SudoRefused(f"you do not exist in the passwd database (uid {uid})") from None


async def _wait_readable(sock: socket.socket, until: asyncio.Future | None = None) -> None:
    """Until `sock` is readable (or `until` is done). The reader is removed before this returns, also when
    cancelled: a registration outliving its socket would be inherited by the next socket to get its fd."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await asyncio.wait([ready] if until is None else [ready, until], return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)


async def _receive(sock: socket.socket) -> tuple[bytes, list[int], tuple[int, int, int]]:
    """The request, the file descriptors passed with it and the sender's (pid, uid, gid) as the kernel
    vouches for them."""
    fds = array.array("i")
    space = socket.CMSG_SPACE(_STREAMS * fds.itemsize) + socket.CMSG_SPACE(_CREDENTIALS.size)
    while True:
        await _wait_readable(sock)
        try:
            data, ancillary, _, _ = sock.recvmsg(_MAX_REQUEST, space)
            break
        except BlockingIOError:
            continue
    credentials = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            credentials = _CREDENTIALS.unpack(payload[:_CREDENTIALS.size])
    if not data or credentials is None:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the client closed the connection or sent no credentials")
    return data, list(fds), credentials


async def _send(sock: socket.socket, message: dict) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, json.dumps(message).encode())
