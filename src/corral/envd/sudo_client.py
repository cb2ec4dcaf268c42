"""`sudo` inside sandboxes: what /usr/bin/sudo (and sudoedit) runs in Corral's templates.

Root runs the real sudo directly. Anyone else asks envd's sudo service (`sudo.py`), which starts the real
sudo as root with this process's arguments, environment, working directory and standard streams, passes
on the signals this process gets, and reports sudo's exit status, which this process then exits with.
Runs as `python3 -I -S` with the standard library only.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import struct
import sys

ADDRESS = "\0corral-envd-sudo"  # sudo.ADDRESS; not imported, so this stays a standard-library script
REAL_SUDO_DIR = "/usr/libexec/corral"
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
              signal.SIGALRM)


def _fail(message: str) -> None:
    sys.stderr.write(f"sudo: {message}\n")
    sys.exit(1)


def _streams() -> list[int]:
    """This process's stdin, stdout and stderr; a closed one is passed as /dev/null."""
    fds = []
    for fd in range(3):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def main() -> None:
    name = "sudoedit" if os.path.basename(sys.argv[0]) == "sudoedit" else "sudo"
    if os.geteuid() == 0:
        real = os.path.join(REAL_SUDO_DIR, name)
        os.execv(real, [real, *sys.argv[1:]])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        sock.connect(ADDRESS)
        _, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
    except OSError as e:
        _fail(f"cannot reach envd's sudo service ({e.strerror}); sudo needs Corral's envd running as root")
    # The greeting carries the service's credentials, checked by the kernel: only root can claim uid 0.
    server_uid = next((_CREDENTIALS.unpack(payload[:_CREDENTIALS.size])[1] for level, kind, payload in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
    if server_uid != 0:
        _fail("the sudo service is not run by root; refusing to use it")
    request = json.dumps({"argv": [name, *sys.argv[1:]], "env": dict(os.environ), "cwd": os.getcwd()})
    try:
        sock.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", _streams()))])
    except OSError as e:
        _fail(f"cannot send the command to envd ({e.strerror})")

    def forward(signum: int, _frame) -> None:
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"signal": signum}).encode())

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    try:
        answer = sock.recv(1 << 16)
    except OSError:
        answer = b""
    if not answer:
        _fail("envd's sudo service closed the connection")
    result = json.loads(answer)
    if "error" in result:
        _fail(result["error"])
    returncode = int(result["exit"])
    if returncode < 0:  # sudo was killed by a signal: end the same way
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    sys.exit(returncode & 0xFF if returncode >= 0 else 128 - returncode)


if __name__ == "__main__":
    main()
