"""Templates Corral ships with."""

from __future__ import annotations

from corral.envd import DEFAULT_PORT as ENVD_PORT
from corral.templates.envd_layer import START_COMMAND as ENVD_START
from corral.templates.recipe import ReadyCheck, Recipe

BASE = Recipe(
    name="base",
    packages=(
        "bash", "coreutils", "procps", "ca-certificates", "curl", "git", "sudo", "python3", "python3-pip",
        "python3-venv", "nodejs", "npm", "tini", "iproute2", "less", "nano",
    ),
    setup=(
        "useradd --create-home --uid 1000 --shell /bin/bash user",
        "echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user && chmod 0440 /etc/sudoers.d/user",
        "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin",
        # pip may install into the system Python for the sandbox's user, as on E2B.
        "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED",
        # Every SDK command is `bash -l -c`, so the login path is on the hot path. /etc/profile forks
        # `id -u` (~40 ms under gVisor) just to tell root from others; bash already knows ($EUID), and
        # other shells (no $EUID) still run `id -u`. Same PATH and prompt for everyone, ~40 ms less.
        """sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/g' /etc/profile && grep -q 'EUID:-' /etc/profile""",
    ),
    # tini reaps orphans as PID 1; envd is its only child, so every process a client starts descends
    # from the template's start command and is part of every checkpoint.
    start_command=("/usr/bin/tini", "-s", "--", *ENVD_START, "--default-user", "user", "--workdir", "/home/user"),
    ready=ReadyCheck(port=ENVD_PORT),
    workdir="/home/user",
)

BUILTIN: dict[str, Recipe] = {r.name: r for r in (BASE,)}
