"""Templates Corral ships with."""

from __future__ import annotations

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
    ),
    # tini reaps orphans as PID 1; envd (its own issue) will replace `sleep`.
    start_command=("/usr/bin/tini", "-s", "--", "/bin/sleep", "infinity"),
    ready=ReadyCheck(command=("/bin/true",)),
    workdir="/home/user",
)

BUILTIN: dict[str, Recipe] = {r.name: r for r in (BASE,)}
