"""Per-user spawners: small helper processes that start a user's commands without forking envd.

Switching user forces Python to fork() envd (40 MB) instead of vfork(); under gVisor that costs
~20 ms per command. A spawner already runs as the user, so it starts commands with posix_spawn. envd
starts one for the default user at start-up (so it is part of every template snapshot) and others on
first use; a spawner that dies is replaced on the next command, and its running commands report -1.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import os
import socket
import struct
import subprocess
import sys

from corral.envd.users import User

_BOOT = ("import sys; sys.path[:0] = [sys.argv[1]]; "
         "from corral.envd.spawner_child import main; main(int(sys.argv[2]))")
_LIB = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SpawnerGone(Exception):
    pass


class Spawner:
    def __init__(self, user: User, process: subprocess.Popen, sock: socket.socket) -> None:
        self.user = user
        self._process = process
        self._sock = sock
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._exits: dict[int, asyncio.Future] = {}
        self._early_exits: dict[int, int] = {}
        self._buffer = b""
        self.alive = True
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    @classmethod
    def launch(cls, user: User) -> Spawner:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, _LIB, str(child.fileno())], pass_fds=[child.fileno()],
                user=user.uid, group=user.gid, extra_groups=list(user.groups), cwd="/", start_new_session=True,
                stdin=subprocess.DEVNULL, env={"PATH": os.defpath})
        finally:
            child.close()
        return cls(user, process, parent)

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> int:
        if not self.alive:
            raise SpawnerGone(self.user.name)
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        data = json.dumps({"id": request_id, "argv": argv, "env": env, "cwd": cwd}).encode()
        try:
            self._sock.sendmsg([struct.pack(">I", len(data)) + data],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError as e:
            self._pending.pop(request_id, None)
            self._die()
            raise SpawnerGone(str(e)) from e
        answer = await future
        if "pid" not in answer:
            raise OSError(answer.get("errno", 0), answer.get("error", "spawn failed"))
        pid = answer["pid"]
        self._exits[pid] = exit_future = asyncio.get_running_loop().create_future()
        if pid in self._early_exits:
            exit_future.set_result(self._early_exits.pop(pid))
        return pid

    def wait(self, pid: int) -> asyncio.Future:
        return self._exits[pid]

    @property
    def running(self) -> bool:
        """Whether a command it started has not been reported exited yet."""
        return bool(self._pending) or any(not future.done() for future in self._exits.values())

    def _readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._die()
                return
            message = json.loads(data[4:])
            if "exited" in message:
                pid, code = message["exited"], message["returncode"]
                future = self._exits.pop(pid, None)
                if future is None:
                    self._early_exits[pid] = code  # exited before its spawn answer was handled
                elif not future.done():
                    future.set_result(code)
            elif (future := self._pending.pop(message.get("id"), None)) is not None and not future.done():
                future.set_result(message)

    def _die(self) -> None:
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SpawnerGone(self.user.name))
        for future in self._exits.values():
            if not future.done():
                future.set_result(-1)  # the exit status went with the spawner
        with contextlib.suppress(Exception):
            self._process.kill()
            self._process.wait(1)

    def close(self) -> None:
        self._die()


class Spawners:
    """Spawners for root and for the users envd was told to prepare (the default user), made on demand.

    Root's commands need one too: envd would otherwise fork itself for each, since passing supplementary
    groups rules out vfork. Other users' commands fork envd as before: a resident spawner would be a
    process of that user, and `userdel` refuses to remove a user who has one.
    """

    def __init__(self) -> None:
        self._by_uid: dict[int, Spawner] = {}
        self._resident: set[int] = {0}
        self._retired: list[Spawner] = []

    def prepare(self, user: User) -> None:
        self._resident.add(user.uid)
        self.for_user(user)

    def for_user(self, user: User) -> Spawner | None:
        if os.geteuid() != 0 or user.uid not in self._resident:
            return None  # forks as before (and an unprivileged development envd runs all as itself)
        self._close_idle_retired()
        spawner = self._by_uid.get(user.uid)
        if spawner is not None and spawner.alive and spawner.user != user:
            # The account changed (e.g. `usermod -aG`): new commands get the new identity, as a new login
            # would; the old spawner stays until the commands it started have exited.
            self._retired.append(spawner)
            spawner = None
        if spawner is None or not spawner.alive:
            spawner = self._by_uid[user.uid] = Spawner.launch(user)
        return spawner

    def _close_idle_retired(self) -> None:
        for spawner in [s for s in self._retired if not s.running]:
            spawner.close()
            self._retired.remove(spawner)

    def close(self) -> None:
        for spawner in [*self._by_uid.values(), *self._retired]:
            spawner.close()
        self._by_uid.clear()
        self._retired.clear()
