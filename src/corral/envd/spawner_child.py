"""The spawner process: runs as one sandbox user and starts that user's commands with posix_spawn.

Started by envd (see spawner.py) with one end of a socketpair. Requests arrive as one JSON message with
the command's stdin/stdout/stderr passed as file descriptors; the answer is the new pid. Exits of its
children are reported on the same socket. Kept to a few standard-library modules so it stays small.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import struct

_FDS = 3


def _send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _receive(sock: socket.socket) -> tuple[dict, list[int]] | None:
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_LEN(_FDS * fds.itemsize))
    if not data:
        return None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return json.loads(data[4:]), list(fds)


def _spawn(request: dict, fds: list[int]) -> int:
    env = request["env"]
    path = request["argv"][0]
    if "/" not in path:
        for directory in env.get("PATH", os.defpath).split(":"):
            candidate = os.path.join(directory or ".", path)
            if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
                path = candidate
                break
    os.chdir(request["cwd"])  # inherited by the child; posix_spawn has no chdir of its own here
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
    return os.posix_spawn(path, request["argv"], env, file_actions=actions, setsid=True)


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reaper_r, reaper_w = os.pipe()
    os.set_blocking(reaper_w, False)
    signal.set_wakeup_fd(reaper_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(reaper_r, select.POLLIN)
    while True:
        for ready, _ in poller.poll():
            if ready == reaper_r:
                os.read(reaper_r, 512)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    _send(sock, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})
                continue
            received = _receive(sock)
            if received is None:
                return  # envd is gone
            request, fds = received
            try:
                pid = _spawn(request, fds)
                _send(sock, {"id": request["id"], "pid": pid})
            except OSError as e:
                _send(sock, {"id": request["id"], "errno": e.errno, "error": e.strerror or str(e)})
            finally:
                for descriptor in fds:
                    os.close(descriptor)
