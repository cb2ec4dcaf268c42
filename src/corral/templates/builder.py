"""Builds a template from E2B build steps: RUN, COPY, ENV, WORKDIR, USER, then the start and ready commands.

Each step that changes files runs in its own gVisor sandbox over a copy-on-write root (the layers of the
base and of the steps before it, read-only) and leaves its changes as one new layer: the sandbox's upper
directory, taken with a filesystem-only checkpoint. A layer is cached under a key made of its parent's
key, the step's content and the context it runs in (user, workdir, env; for COPY the uploaded files'
hash), so a rebuild reuses every layer up to the first changed step and reruns from there. ENV, USER and
WORKDIR only change that context; the commands they imply (create the user, make the directory) run as
root at the start of the next step that runs anything.

The last sandbox boots envd on all the layers, starts the start command in the background, waits for the
ready command to pass and is checkpointed with its memory: sandboxes of the template are restored from
that checkpoint exactly as those of the built-in templates are.

Layout under the cache directory:

  build-layers/<key>        symlink to the layer's checkpoint directory (a forced rebuild repoints it;
                            templates built on the old one keep standing on it)
  build-layers/l-<random>/  a filesystem-only checkpoint: layer/ holds the step's changes
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import posixpath
import secrets
import shlex
import shutil
import stat
import struct
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from corral.envd import DEFAULT_PORT as ENVD_PORT
from corral.network.connections import port_accepts
from corral.runtime.base import Resources, Runtime, SandboxConfig, Snapshot
from corral.templates.envd_layer import START_COMMAND as ENVD_START

# Bump when the way steps are run changes what they produce, so cached layers are not reused.
STEP_FORMAT = 1
COPY_ROOT = ".corral-copy"
START_LOG = "/var/log/corral/start.log"
_UNKNOWN_USER = 213
_NO_WORKDIR = 214

# Runs one step inside a build sandbox, as root: the pending setup commands, then `command` as `user` in
# `workdir` through a login shell (as envd runs commands). Arguments: setup, user, workdir, command.
_STEP_SCRIPT = r"""
if [ -n "$1" ]; then /bin/sh -ec "$1" || exit $?; fi
u="$2"; wd="$3"; cmd="$4"
if ! id -u "$u" >/dev/null 2>&1; then exit 213; fi
cd "$wd" 2>/dev/null || { echo "working directory $wd does not exist" >&2; exit 214; }
home=$(getent passwd "$u" | cut -d: -f6)
export HOME="${home:-/}" USER="$u" LOGNAME="$u"
shell=/bin/bash; [ -x "$shell" ] || shell=/bin/sh
if [ "$(id -u "$u")" = 0 ]; then exec "$shell" -l -c "$cmd"; fi
exec setpriv --reuid="$(id -u "$u")" --regid="$(id -g "$u")" --init-groups "$shell" -l -c "$cmd"
"""

# COPY inside the build sandbox, as root. Arguments: source (under /.corral-copy), destination, owner, mode.
# A directory's contents are merged into the destination (Docker's semantics), a file lands at the
# destination or, when it ends with "/", in it.
_COPY_SCRIPT = r"""
set -e
src="$1"; dest="$2"; owner="$3"; mode="$4"
if [ -d "$src" ] && [ ! -L "$src" ]; then
  if [ ! -e "$dest" ]; then mkdir -p "$dest"; chown "$owner" "$dest"; fi
  for e in "$src"/* "$src"/.[!.]* "$src"/..?*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    name=${e##*/}
    cp -a "$e" "$dest/"
    chown -hR "$owner" "$dest/$name"
    if [ -n "$mode" ] && [ ! -L "$dest/$name" ]; then chmod -R "$mode" "$dest/$name"; fi
  done
else
  case "$dest" in
    */) mkdir -p "$dest"; target="$dest${src##*/}";;
    *) mkdir -p "$(dirname "$dest")"; target="$dest";;
  esac
  if [ -d "$target" ] && [ ! -L "$target" ]; then target="$target/${src##*/}"; fi
  rm -f "$target" 2>/dev/null || true
  cp -a "$src" "$target"
  chown -h "$owner" "$target"
  if [ -n "$mode" ] && [ ! -L "$target" ]; then chmod "$mode" "$target"; fi
fi
"""


class BuildFailed(Exception):
    """A build stopped; `step` is the SDK's name for where ("base", "1".."n", "finalize")."""

    def __init__(self, message: str, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.step = step


@dataclass(frozen=True)
class BuildStep:
    number: int  # 1-based, as the SDK numbers them
    kind: str  # RUN COPY ENV WORKDIR USER
    args: tuple[str, ...]
    force: bool = False
    files_hash: str | None = None


@dataclass(frozen=True)
class BuildPlan:
    base_layers: tuple[Path, ...]  # the base's read-only layers, top first
    base_key: str  # what the base is (a template snapshot, an image digest): the first cache key's parent
    steps: tuple[BuildStep, ...] = ()
    start_cmd: str | None = None
    ready_cmd: str | None = None
    force: bool = False
    resources: Resources = field(default_factory=Resources)
    ready_timeout_s: float = 600.0
    step_timeout_s: float = 3600.0
    # Refuse COPY uploads whose content does not hash to the step's filesHash (the Python SDK's rule).
    verify_files_hash: bool = True


# (level, message, step): where a build's log lines go.
BuildLog = Callable[[str, str, str | None], None]


@dataclass
class _Context:
    user: str = "root"
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # root commands the next running step starts with

    def as_key(self) -> dict:
        return {"user": self.user, "workdir": self.workdir, "env": self.env, "setup": self.setup}


class Builder:
    def __init__(self, runtime: Runtime, cache_dir: Path, *, dns_address: str, envd_layer: Callable,
                 extra_ca_pem: str = "", archive: Callable[[str], Path | None] = lambda _: None) -> None:
        """`envd_layer`: an async function giving the envd layer's directory; `archive(files_hash)`: the
        uploaded tar of a COPY step; `extra_ca_pem`: certificates every template trusts beyond its bundle."""
        self.runtime = runtime
        self.cache = cache_dir
        self.layers_dir = cache_dir / "build-layers"
        self.dns_address = dns_address
        self.envd_layer = envd_layer
        self.extra_ca_pem = extra_ca_pem.strip()
        self.archive = archive

    async def build(self, plan: BuildPlan, target: Path, work: Path, log: BuildLog,
                    archive: Callable[[str], Path | None] | None = None) -> Snapshot:
        """Runs `plan` and checkpoints the finished template into `target`; `work` is scratch space for
        this build (removed by the caller); `archive(files_hash)` finds the build's uploaded COPY files."""
        archive_of = archive or self.archive
        work.mkdir(parents=True, exist_ok=True)
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        ctx = _Context()
        base = list(plan.base_layers)
        done: list[Path] = []  # step layers, top first
        key = _digest({"format": STEP_FORMAT, "base": plan.base_key})
        forced = plan.force
        # E2B's implicit `USER user` after the base: every user step starts as `user` in its home.
        if "user" not in _users(base):
            ctx.setup.append("useradd --create-home --shell /bin/bash user && mkdir -p /etc/sudoers.d && "
                             "echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user && "
                             "chmod 0440 /etc/sudoers.d/user")
        ctx.user, ctx.workdir = "user", "/home/user"
        etc = await self._etc_layer(work / "etc", [*done, *base])
        log("info", f"Base layers ready ({len(base)} layers)", "base")

        for step in plan.steps:
            label = str(step.number)
            forced = forced or step.force
            if step.kind == "ENV":
                pairs = step.args
                if len(pairs) % 2:
                    raise BuildFailed("ENV needs key/value pairs", label)
                new = dict(zip(pairs[::2], pairs[1::2], strict=True))
                ctx.env.update(new)
                log("info", f"[{label}] ENV {' '.join(f'{k}={v}' for k, v in new.items())}", label)
                continue
            if step.kind == "WORKDIR":
                path = _join(ctx.workdir, _one(step, "WORKDIR"))
                ctx.setup.append(f"mkdir -p {shlex.quote(path)} && chown {shlex.quote(ctx.user)}: {shlex.quote(path)}")
                ctx.workdir = path
                log("info", f"[{label}] WORKDIR {path}", label)
                continue
            if step.kind == "USER":
                user = _one(step, "USER")
                if not _valid_user(user):
                    raise BuildFailed(f"invalid user name {user!r}", label)
                if user not in _users([*done, *base]) and user != ctx.user:
                    ctx.setup.append(f"id -u {user} >/dev/null 2>&1 || useradd --create-home --shell /bin/bash {user}")
                ctx.user = user
                log("info", f"[{label}] USER {user}", label)
                continue
            if step.kind not in ("RUN", "COPY"):
                raise BuildFailed(f"unknown step type {step.kind!r} (known: RUN, COPY, ENV, WORKDIR, USER)", label)

            archive, content = None, None
            if step.kind == "COPY":
                archive, content = await self._uploaded(step, plan, archive_of, log, label)
            # A COPY's layer is keyed by the content the server hashed, never by the client's word for it.
            key = _digest({"parent": key, "kind": step.kind, "args": list(step.args), "files": content,
                           **ctx.as_key()})
            cached = self.layers_dir / key
            if not forced and cached.is_dir() and (cached / "layer").is_dir():
                log("info", f"[{label}] CACHED {step.kind} {_describe(step)}", label)
                with contextlib.suppress(OSError):
                    os.utime(cached.resolve())  # recently used: the cache's eviction keeps it
            else:
                log("info", f"[{label}] {step.kind} {_describe(step)}", label)
                started = time.monotonic()
                if step.kind == "RUN":
                    layer = await self._run_step(step, ctx, [etc, *done, *base], plan, log, label)
                else:
                    layer = await self._copy_step(step, ctx, [etc, *done, *base], plan, work, log, label, archive)
                _point(cached, layer)
                log("info", f"[{label}] done in {time.monotonic() - started:.1f}s", label)
            done.insert(0, (cached.resolve() / "layer"))
            ctx.setup = []
        return await self._finalize(plan, ctx, done, base, target, work, log)

    # ------------------------------------------------------------------------------------------ steps

    async def _boot(self, layers: list[Path], plan: BuildPlan, label: str) -> str:
        try:
            sandbox = await self.runtime.boot(layers, ["/bin/sh", "-c", "exec sleep infinity"],
                                              SandboxConfig(resources=plan.resources), template="build")
        except Exception as e:
            raise BuildFailed(f"could not start the build sandbox: {e}", label) from None
        return sandbox.id

    async def _run_in(self, sandbox_id: str, script: str, args: list[str], ctx: _Context, timeout: float,
                      log: BuildLog, label: str, *, quiet: bool = False) -> int:
        def output(stream: str, line: str) -> None:
            if not quiet:
                log("info", line, label)

        try:
            result = await self.runtime.exec(sandbox_id, ["/bin/sh", "-c", script, "corral-step", *args],
                                             env=ctx.env, cwd="/", timeout=timeout, on_output=output)
        except TimeoutError:
            raise BuildFailed(f"the step did not finish within {timeout:.0f}s", label) from None
        except Exception as e:
            raise BuildFailed(f"the step could not run: {e}", label) from None
        return result.exit_code

    async def _take_layer(self, sandbox_id: str) -> Path:
        directory = self.layers_dir / f"l-{secrets.token_hex(8)}"
        await self.runtime.checkpoint(sandbox_id, directory, leave_running=False, memory=False)
        return directory

    async def _run_step(self, step: BuildStep, ctx: _Context, layers: list[Path], plan: BuildPlan,
                        log: BuildLog, label: str) -> Path:
        if not step.args:
            raise BuildFailed("RUN needs a command", label)
        command = step.args[0]
        user = step.args[1] if len(step.args) > 1 and step.args[1] else ctx.user
        sandbox_id = await self._boot(layers, plan, label)
        try:
            code = await self._run_in(sandbox_id, _STEP_SCRIPT, [" && ".join(ctx.setup), user, ctx.workdir, command],
                                      ctx, plan.step_timeout_s, log, label)
            _check_exit(code, user, ctx.workdir, command, label)
            return await self._take_layer(sandbox_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.runtime.destroy(sandbox_id)
            raise

    async def _uploaded(self, step: BuildStep, plan: BuildPlan, archive_of: Callable[[str], Path | None],
                        log: BuildLog, label: str) -> tuple[Path, str]:
        """The COPY's uploaded archive and the hash of its content by the Python SDK's rule."""
        if len(step.args) < 2:
            raise BuildFailed("COPY needs a source and a destination", label)
        if not step.files_hash:
            raise BuildFailed("COPY needs the filesHash of its uploaded files", label)
        archive = archive_of(step.files_hash)
        if archive is None:
            raise BuildFailed(f"the files of COPY {step.args[0]} (hash {step.files_hash}) were never uploaded", label)
        try:
            content = await asyncio.to_thread(archive_hash, archive, step.args[0], step.args[1])
        except BuildFailed as e:
            raise BuildFailed(e.message, label) from None
        if content != step.files_hash:
            if plan.verify_files_hash:
                raise BuildFailed(f"the files uploaded for COPY {step.args[0]} {step.args[1]} do not match its "
                                  f"filesHash {step.files_hash} (a different upload, or one changed in transit)", label)
            # The JS SDK also hashes directories' sizes, which an archive does not record.
            log("warn", f"[{label}] the uploaded files cannot be checked against filesHash (a client whose hash "
                        "covers what the archive does not record); using them as uploaded", label)
        return archive, content

    async def _copy_step(self, step: BuildStep, ctx: _Context, layers: list[Path], plan: BuildPlan, work: Path,
                         log: BuildLog, label: str, archive: Path) -> Path:
        if len(step.args) < 2:
            raise BuildFailed("COPY needs a source and a destination", label)
        src, dest = step.args[0], step.args[1]
        owner = (step.args[2] if len(step.args) > 2 else "") or ctx.user
        mode = step.args[3] if len(step.args) > 3 else ""
        if mode and not (mode.isdigit() and set(mode) <= set("01234567") and len(mode) <= 4):
            raise BuildFailed(f"COPY mode must be octal such as 0755, got {mode!r}", label)
        staging = work / f"copy-{step.number}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            await asyncio.to_thread(_unpack, archive, staging / COPY_ROOT, src)
        except BuildFailed as e:
            raise BuildFailed(e.message, label) from None
        source = posixpath.join("/", COPY_ROOT, _strip_glob(src))
        if not os.path.lexists(staging / source.lstrip("/")):
            raise BuildFailed(f"COPY source {src!r} is not among the uploaded files", label)
        target = dest if dest.startswith("/") else _join(ctx.workdir, dest) + ("/" if dest.endswith("/") else "")
        owner_spec = owner if ":" in owner else f"{owner}:"
        sandbox_id = await self._boot([staging, *layers], plan, label)
        try:
            copy = _COPY_SCRIPT + "\n"
            command = (f"/bin/sh -c {shlex.quote(copy)} corral-copy {shlex.quote(source)} {shlex.quote(target)} "
                       f"{shlex.quote(owner_spec)} {shlex.quote(mode)}")
            code = await self._run_in(sandbox_id, _STEP_SCRIPT, [" && ".join(ctx.setup), "root", "/", command],
                                      ctx, plan.step_timeout_s, log, label)
            if code != 0:
                raise BuildFailed(f"COPY {src} {dest} failed (exit status {code}); is the owner {owner!r} a user "
                                  "of the template?", label)
            return await self._take_layer(sandbox_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.runtime.destroy(sandbox_id)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # --------------------------------------------------------------------------------------- finalize

    async def _finalize(self, plan: BuildPlan, ctx: _Context, done: list[Path], base: list[Path], target: Path,
                        work: Path, log: BuildLog) -> Snapshot:
        label = "finalize"
        stack = [*done, *base]
        etc = await self._etc_layer(target.with_name(f"{target.name}.etc"), stack)
        if not ctx.setup and (owner := _ids_of(stack, ctx.user)) is not None:
            # The start command's log, made here rather than by a command in the sandbox (~0.1 s less).
            log_file = etc / START_LOG.lstrip("/")
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_file.touch()
            os.chown(log_file, *owner)
        envd = await self.envd_layer()
        init = ["/usr/bin/tini", "-s", "--"] if _exists_in(stack, "usr/bin/tini") else []
        command = [*init, *ENVD_START, "--default-user", ctx.user, "--workdir", ctx.workdir]
        log("info", f"Starting the template as {ctx.user} in {ctx.workdir}", label)
        try:
            sandbox = await self.runtime.boot([etc, envd, *stack], command, SandboxConfig(resources=plan.resources),
                                              template="build", cwd=ctx.workdir)
        except Exception as e:
            raise BuildFailed(f"the template did not start: {e}", label) from None
        sandbox_id = sandbox.id
        try:
            await self._wait_envd(sandbox_id, label)
            owner = _ids_of(stack, ctx.user)
            if ctx.setup or owner is None:  # the user is made by the setup: the log is made after it
                setup = [*ctx.setup, f"mkdir -p {posixpath.dirname(START_LOG)} && touch {START_LOG} && "
                                     f"chown {shlex.quote(ctx.user)}: {START_LOG}"]
                code = await self._run_in(sandbox_id, _STEP_SCRIPT, [" && ".join(setup), "root", "/", "true"], ctx,
                                          600, log, label)
                _check_exit(code, "root", "/", "setup", label)
            ready = plan.ready_cmd
            if plan.start_cmd:
                log("info", f"Starting: {plan.start_cmd}", label)
                # Through envd, as every later command of the sandbox: a process envd spawned is part of the
                # checkpoint like any other (one `runsc exec` left behind is not restored).
                await _start_process(self.runtime.address(sandbox_id, ENVD_PORT), ctx.user, ctx.workdir, ctx.env,
                                     f"exec >>{START_LOG} 2>&1 </dev/null\n{plan.start_cmd}", label)
                ready = ready or "sleep 20"  # E2B's default when only a start command is given
            if ready:
                await self._wait_ready(sandbox_id, ready, ctx, plan, log, label)
            log("info", "Snapshotting the template with its processes running", label)
            return await self.runtime.checkpoint(sandbox_id, target, leave_running=False, memory=True)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.runtime.destroy(sandbox_id)
            raise

    async def _wait_envd(self, sandbox_id: str, label: str) -> None:
        deadline = time.monotonic() + 60
        host, port = self.runtime.address(sandbox_id, ENVD_PORT)
        while time.monotonic() < deadline:
            if await port_accepts(host, port):
                return
            await asyncio.sleep(0.05)
        tail = self.runtime.log_tail(sandbox_id, 10)
        raise BuildFailed("envd did not start in the template (it needs /usr/bin/python3, Python 3.11): "
                          f"{tail}", label)

    async def _wait_ready(self, sandbox_id: str, ready: str, ctx: _Context, plan: BuildPlan, log: BuildLog,
                          label: str) -> None:
        log("info", f"Waiting for the ready command: {ready}", label)
        deadline = time.monotonic() + plan.ready_timeout_s
        interval = 0.05
        while True:
            code = await self._run_in(sandbox_id, _STEP_SCRIPT, ["", ctx.user, ctx.workdir, ready], ctx,
                                      plan.ready_timeout_s, log, label, quiet=True)
            if code == 0:
                log("info", "Template is ready", label)
                return
            if code in (_UNKNOWN_USER, _NO_WORKDIR):
                _check_exit(code, ctx.user, ctx.workdir, ready, label)
            if time.monotonic() > deadline:
                result = await self.runtime.exec(sandbox_id, ["tail", "-n", "20", START_LOG], timeout=30)
                output = result.stdout.decode(errors="replace").strip()
                raise BuildFailed(f"the ready command `{ready}` did not pass within {plan.ready_timeout_s:.0f}s"
                                  + (f"; the start command's output ends with:\n{output}" if output else ""), label)
            await asyncio.sleep(interval)
            interval = min(0.5, interval * 2)  # quick first retries: most services are up within 100 ms

    async def _etc_layer(self, directory: Path, stack: list[Path]) -> Path:
        """DNS for the sandbox network and, with extra CAs, a trust store that holds them (the stack's own
        bundle plus them) and environment variables that point Node, requests and others at it."""
        shutil.rmtree(directory, ignore_errors=True)
        (directory / "etc").mkdir(parents=True)
        (directory / "etc" / "resolv.conf").write_text(f"nameserver {self.dns_address}\n")
        if self.extra_ca_pem:
            write_trust(directory, _read_in_stack(stack, "etc/ssl/certs/ca-certificates.crt") or "",
                        self.extra_ca_pem)
        return directory


BUNDLE = "etc/ssl/certs/ca-certificates.crt"
_CA_ENV = ("NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "PIP_CERT",
           "GIT_SSL_CAINFO")


def write_trust(layer: Path, bundle: str, extra_pem: str) -> None:
    """Adds `extra_pem` to a trust store in `layer` (an overlay layer above a root filesystem whose bundle
    is `bundle`): the bundle with them appended, the certificates where `update-ca-certificates` keeps
    local ones (so they survive it running again), and a profile script for tools with their own stores."""
    certs = layer / "etc" / "ssl" / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    text = bundle if not bundle or bundle.endswith("\n") else bundle + "\n"
    if extra_pem not in text:
        text += extra_pem + "\n"
    (certs / "ca-certificates.crt").write_text(text)
    local = layer / "usr" / "local" / "share" / "ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    (local / "corral-operator.crt").write_text(extra_pem + "\n")
    profile = layer / "etc" / "profile.d"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "corral-ca.sh").write_text(
        "# Tools with their own certificate stores use the system's, which holds the operator's CAs.\n"
        + "".join(f"export {name}=${{{name}:-/{BUNDLE}}}\n" for name in _CA_ENV))


def evict_layers(layers_dir: Path, max_bytes: int, unused: list[Path]) -> int:
    """Removes cached step layers, oldest use first, from `unused` (layers no template, sandbox or
    checkpoint stands on and no build used lately) until the cache holds at most `max_bytes`; then the
    keys that point at removed layers. Returns the bytes freed."""
    from corral.storage.disk import tree_size

    total = tree_size(layers_dir) if layers_dir.is_dir() else 0
    freed = 0
    for layer in sorted(unused, key=lambda p: p.stat().st_mtime):
        if total - freed <= max_bytes:
            break
        size = tree_size(layer)
        shutil.rmtree(layer, ignore_errors=True)
        freed += size
    for key in layers_dir.iterdir() if freed else ():
        if key.is_symlink() and not key.exists():
            key.unlink(missing_ok=True)
    return freed


async def _start_process(address: tuple[str, int], user: str, cwd: str, env: dict[str, str], script: str,
                         label: str) -> None:
    """Starts `script` in the background through envd's Process/Start (Connect, one JSON message in an
    envelope) and returns once envd reports it started; leaving the stream does not stop it."""
    body = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", script], "envs": env, "cwd": cwd},
                       "stdin": False}).encode()
    headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
               "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}
    url = f"http://{address[0]}:{address[1]}/process.Process/Start"
    try:
        async with httpx.AsyncClient(timeout=60) as client, client.stream(
                "POST", url, content=b"\0" + struct.pack(">I", len(body)) + body, headers=headers) as response:
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                if len(buffer) >= 5 and len(buffer) >= 5 + (size := struct.unpack(">I", buffer[1:5])[0]):
                    message = json.loads(buffer[5:5 + size] or b"{}")
                    if buffer[0] & 2:  # the end of the stream: an error before the process started
                        error = message.get("error") or {}
                        if error.get("code") == "unauthenticated":
                            _check_exit(_UNKNOWN_USER, user, cwd, script, label)
                        raise BuildFailed(f"the start command could not start: {error.get('message') or message}",
                                          label)
                    return
    except httpx.HTTPError as e:
        raise BuildFailed(f"the start command could not be started through envd: {e}", label) from None
    raise BuildFailed("envd ended the start command's stream before it started", label)


def _check_exit(code: int, user: str, workdir: str, command: str, label: str) -> None:
    if code == 0:
        return
    if code == _UNKNOWN_USER:
        # The wording E2B's builder uses (envd refusing the user), which users and tests look for.
        raise BuildFailed(f"failed to run command 'whoami': command failed: unauthenticated: invalid username: "
                          f"'{user}'", label)
    if code == _NO_WORKDIR:
        raise BuildFailed(f"the working directory {workdir} does not exist", label)
    raise BuildFailed(f"Command failed with exit code {code}: {command}", label)


def _one(step: BuildStep, kind: str) -> str:
    if len(step.args) < 1 or not step.args[0]:
        raise BuildFailed(f"{kind} needs an argument", str(step.number))
    return step.args[0]


def _valid_user(name: str) -> bool:
    return bool(name) and len(name) <= 32 and all(c.isalnum() or c in "_-." for c in name) and name[0] != "-"


def _join(workdir: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(workdir, path))


def _describe(step: BuildStep) -> str:
    if step.kind == "RUN":
        return step.args[0] if step.args else ""
    return " ".join(a for a in step.args[:2])


def _strip_glob(src: str) -> str:
    """The directory a glob source stands for (`folder/*` → `folder`, `*.txt` → the context)."""
    parts = []
    for part in posixpath.normpath(src).split("/"):
        if any(c in part for c in "*?[{"):
            break
        parts.append(part)
    path = "/".join(p for p in parts if p not in ("", "."))
    if path.startswith("..") or path.startswith("/"):
        raise BuildFailed(f"COPY source {src!r} must be inside the context")
    return path


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}")
    tmp.symlink_to(target.name)
    tmp.rename(link)


def _inside(layer: Path, rel: str) -> Path | None:
    """`layer/rel` when it is a regular file that does not leave the layer through a symlink."""
    path = layer / rel
    try:
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(layer.resolve()) or not stat.S_ISREG(os.lstat(real).st_mode):
            return None
    except OSError:
        return None
    return real


def _present(layer: Path, rel: str) -> bool:
    return os.path.lexists(layer / rel)


def _read_in_stack(stack: list[Path], rel: str) -> str | None:
    """A file as the overlay of `stack` (top first) shows it; None when the top-most layer that has the
    path has no regular file there (a whiteout, a directory, a symlink)."""
    for layer in stack:
        if _present(layer, rel):
            found = _inside(layer, rel)
            return found.read_text(errors="replace") if found else None
    return None


def _exists_in(stack: list[Path], rel: str) -> bool:
    for layer in stack:
        path = layer / rel
        if os.path.lexists(path):
            st = os.lstat(path)
            return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0)
    return False


def _ids_of(stack: list[Path], user: str) -> tuple[int, int] | None:
    """(uid, gid) of `user` in the stack's /etc/passwd."""
    for line in (_read_in_stack(stack, "etc/passwd") or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user and fields[2].isdigit() and fields[3].isdigit():
            return int(fields[2]), int(fields[3])
    return None


def _users(stack: list[Path]) -> set[str]:
    passwd = _read_in_stack(stack, "etc/passwd") or ""
    return {line.split(":", 1)[0] for line in passwd.splitlines() if ":" in line}


def files_hash(archive: tarfile.TarFile, src: str, dest: str) -> str:
    """The E2B SDK's `filesHash` of a COPY, computed again from the archive it uploaded: `COPY src dest`,
    then per entry its path, mode, size (not for directories) and content or link target."""
    digest = hashlib.sha256(f"COPY {src} {dest}".encode())
    kinds = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK}
    for member in archive.getmembers():
        digest.update(member.name.encode())
        mode = kinds.get(member.type, stat.S_IFREG) | member.mode
        digest.update(str(mode).encode())
        if member.issym():
            digest.update(str(len(member.linkname.encode())).encode())
            digest.update(member.linkname.encode())
            continue
        if member.isdir():
            continue
        source = archive.extractfile(member)
        if source is None:
            raise BuildFailed(f"the uploaded archive holds {member.name!r}, which is neither a file, a "
                              "directory nor a symlink")
        data = source.read()
        digest.update(str(len(data)).encode())
        digest.update(data)
    return digest.hexdigest()


def archive_hash(archive: Path, src: str, dest: str) -> str:
    """`files_hash` of an uploaded archive (plain or gzipped tar)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            return files_hash(tar, src, dest)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BuildFailed(f"the uploaded files for COPY {src} are not a readable tar archive: {e}") from None


def _unpack_verified(archive: Path, into: Path, src: str, dest: str, expected: str) -> None:
    if archive_hash(archive, src, dest) != expected:
        raise BuildFailed(f"the files uploaded for COPY {src} {dest} do not match its filesHash "
                          f"{expected} (a different upload, or one changed in transit)")
    _unpack(archive, into, src)


def _unpack(archive: Path, into: Path, src: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            into.mkdir(parents=True)

            def keep_mode(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
                # tarfile's "tar" filter refuses names and hard links leaving `into`, but it also drops
                # group/other write bits, which the user's files may have on purpose.
                filtered = tarfile.tar_filter(member, path)
                if filtered is None or member.issym() or member.islnk():
                    return filtered
                return filtered.replace(mode=member.mode & 0o777, deep=False)

            tar.extractall(into, numeric_owner=True, filter=keep_mode)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BuildFailed(f"the uploaded files for COPY {src} are not a readable tar archive: {e}") from None
