"""Builds templates and finds their snapshots on disk.

Layout under the cache directory (everything keyed by a hash of its inputs, so a changed recipe rebuilds
and an unchanged one is reused):

  rootfs/<rootfs key>/                 debootstrap'ed root filesystem (read-only lower layer)
  rootfs/<rootfs key>.log              its build log
  templates/<name>/<snapshot key>/     checkpoint directory (image/, layer/, checkpoint.json)
  templates/<name>/<snapshot key>.etc/ small layer with /etc/resolv.conf for this host's sandbox network
  templates/<name>/current             symlink to the snapshot in use
  envd/<envd key>/                     envd and its private dependencies (see envd_layer.py)

Every build writes into a `.partial` directory and renames it into place when complete, so a failed or
interrupted build never leaves anything that looks usable.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from corral.config import Settings
from corral.network.connections import port_accepts
from corral.runtime.base import Runtime, SandboxConfig, TemplateNotFound
from corral.storage.disk import tree_size
from corral.templates import envd_layer
from corral.templates.builder import BUNDLE, write_trust
from corral.templates.builtin import BUILTIN
from corral.templates.cachelock import cache_lock
from corral.templates.recipe import Recipe

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


class BuildProgress:
    """What a template build tells whoever watches it: each step as it starts, and the output lines of the
    running step (all of them also go to the build log). This base class ignores both; the CLI shows them
    (corral/cli/build_progress.py).

    Steps, in order: `root filesystem` (when cached) or `debootstrap`, `packages`, `pip`, `npm`, `setup`
    (once per command); then `envd`, `boot`, `ready`, `snapshot`. Steps a recipe does not need are skipped.
    """

    def step(self, name: str, detail: str = "") -> None:
        pass

    def output(self, line: str) -> None:
        pass


class TemplateBuildFailed(Exception):
    status = 500


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    snapshot: Path
    key: str
    size_bytes: int
    built_at: float


class TemplateStore:
    def __init__(self, settings: Settings, recipes: dict[str, Recipe] | None = None) -> None:
        self.settings = settings
        self.recipes = dict(BUILTIN if recipes is None else recipes)
        self.root = settings.cache_dir
        # Certificates every template trusts beyond its bundle (Settings.template_ca).
        self.extra_ca = settings.template_ca_pem()

    # ---------------------------------------------------------------- lookup

    def resolve(self, name: str) -> Path:
        """The snapshot directory sandboxes of template `name` are restored from: `<name>` is its `current`
        build, `<name>:<tag>` a tagged one (templates users build, control/templates.py)."""
        name, _, tag = name.partition(":")
        if not _NAME.match(name) or (tag and not _NAME.match(tag)):
            raise TemplateNotFound(f"template {name!r} not found")
        current = self.root / "templates" / name / ("current" if tag in ("", "default") else f"tag-{tag}")
        if not current.exists():
            known = ", ".join(sorted(self.recipes)) or "none"
            if name not in self.recipes:
                raise TemplateNotFound(f"template {name!r} not found (built-in templates: {known}; templates "
                                       "you build are listed by GET /templates)")
            raise TemplateNotFound(f"template {name!r} is not built (built-in recipes: {known}; "
                                   f"build one with `corral template build {name}`)")
        return current.resolve()

    async def is_current(self, name: str, runtime: Runtime) -> bool:
        """Whether template `name` is built from its recipe as it is now (False after an upgrade changed it)."""
        return self.resolve(name).name == await self._snapshot_key(self.recipes[name], runtime)

    def list(self) -> list[TemplateInfo]:
        out = []
        base = self.root / "templates"
        for entry in sorted(base.iterdir()) if base.is_dir() else []:
            current = entry / "current"
            if not current.exists():
                continue
            snapshot = current.resolve()
            # Snapshots are renamed into place when complete: the directory's time is the build's.
            out.append(TemplateInfo(name=entry.name, snapshot=snapshot, key=snapshot.name,
                                    size_bytes=tree_size(snapshot), built_at=snapshot.stat().st_mtime))
        return out

    async def _snapshot_key(self, recipe: Recipe, runtime: Runtime) -> str:
        return recipe.snapshot_key(self.environment(await runtime.snapshot_compat()))

    def environment(self, runtime_compat: str) -> dict:
        environment = {"runtime": runtime_compat, "dns": str(self.settings.dns_address),
                       "envd": envd_layer.layer_key()}
        if self.extra_ca:
            environment["ca"] = hashlib.sha256(self.extra_ca.encode()).hexdigest()[:16]
        return environment

    # ---------------------------------------------------------------- build

    async def build(self, name: str, runtime: Runtime, *, force: bool = False,
                    progress: BuildProgress | None = None) -> TemplateInfo:
        progress = progress or BuildProgress()
        try:
            recipe = self.recipes[name]
        except KeyError:
            raise TemplateNotFound(
                f"no recipe for template {name!r}; known: {', '.join(sorted(self.recipes))}") from None
        rootfs = await self.ensure_rootfs(recipe, force=force, progress=progress)
        key = await self._snapshot_key(recipe, runtime)
        tdir = self.root / "templates" / name
        snapshot = tdir / key
        if force or not snapshot.is_dir():
            async with cache_lock(self.root / "locks" / f"template-{name}-{key}.lock",
                                  lambda: progress.step("snapshot", "waiting for another build of it")):
                if force or not snapshot.is_dir():  # another process may have built it meanwhile
                    shutil.rmtree(snapshot, ignore_errors=True)
                    await self._build_snapshot(recipe, rootfs, tdir, key, runtime, progress)
        _point_current(tdir, key)
        return next(t for t in self.list() if t.name == name)

    async def ensure_rootfs(self, recipe: Recipe, *, force: bool = False,
                            progress: BuildProgress | None = None) -> Path:
        progress = progress or BuildProgress()
        key = recipe.rootfs_key()
        target = self.root / "rootfs" / key
        if target.is_dir() and not force:
            progress.step("root filesystem", f"cached ({key})")
            return target
        async with cache_lock(self.root / "locks" / f"rootfs-{key}.lock",
                              lambda: progress.step("root filesystem", "waiting for another build of it")):
            if target.is_dir() and not force:  # another process built it meanwhile
                progress.step("root filesystem", f"cached ({key})")
                return target
            await self._make_rootfs(recipe, target, key, progress)
        return target

    async def _make_rootfs(self, recipe: Recipe, target: Path, key: str, progress: BuildProgress) -> None:
        partial = target.with_name(f".{key}.partial")
        log_path = target.with_name(f"{key}.log")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            try:
                progress.step("debootstrap", f"{recipe.suite} (minbase) from {recipe.mirror}")
                await _stream(["debootstrap", "--variant=minbase", recipe.suite, str(partial), recipe.mirror],
                              log, progress)
                if recipe.packages:
                    progress.step("packages", f"{len(recipe.packages)} Debian packages")
                    await _stream(_chroot_with_proc(partial, "apt-get", "install", "-y", "-q",
                                                    "--no-install-recommends", *recipe.packages), log, progress,
                                  env={"DEBIAN_FRONTEND": "noninteractive"})
                if recipe.pip:
                    progress.step("pip", f"{len(recipe.pip)} Python packages")
                    site = f"/usr/local/lib/python{envd_layer.TARGET_PYTHON[0]}/dist-packages"
                    await _stream([*envd_layer.host_pip_install_args(), "--target", f"{partial}{site}",
                                   *recipe.pip], log, progress)
                    # Entry points land in <site>/bin with the host's interpreter in their shebang.
                    await _stream(["chroot", str(partial), "/bin/sh", "-ec",
                                   f"if [ -d {site}/bin ]; then for f in {site}/bin/*; do "
                                   "sed -i '1s|^#!.*python.*$|#!/usr/bin/python3|' \"$f\"; "
                                   f"mv \"$f\" /usr/local/bin/; done; rmdir {site}/bin; fi"], log, progress)
                if recipe.npm:
                    if shutil.which("npm") is None:
                        raise TemplateBuildFailed("npm is needed on the host to install "
                                                  f"{', '.join(recipe.npm)} (scripts/install.sh installs it)")
                    progress.step("npm", ", ".join(recipe.npm))
                    await _stream(["npm", "install", "--global", "--prefix", f"{partial}/usr/local", "--no-audit",
                                   "--no-fund", "--no-update-notifier", *recipe.npm], log, progress)
                for number, command in enumerate(recipe.setup, 1):
                    first_line = command.split("\n", 1)[0]
                    progress.step("setup", f"{number}/{len(recipe.setup)}: {first_line[:60]}")
                    await _stream(["chroot", str(partial), "/bin/sh", "-ec", command], log, progress)
            except TemplateBuildFailed as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise TemplateBuildFailed(f"building the root filesystem of {recipe.name!r} failed: {exc}; "
                                          f"full log: {log_path}") from None
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)

    async def _build_snapshot(self, recipe: Recipe, rootfs: Path, tdir: Path, key: str, runtime: Runtime,
                              progress: BuildProgress) -> None:
        etc_layer = tdir / f"{key}.etc"
        shutil.rmtree(etc_layer, ignore_errors=True)
        (etc_layer / "etc").mkdir(parents=True)
        (etc_layer / "etc" / "resolv.conf").write_text(f"nameserver {self.settings.dns_address}\n")
        if self.extra_ca:
            bundle = rootfs / BUNDLE
            write_trust(etc_layer, bundle.read_text() if bundle.is_file() else "", self.extra_ca)
        progress.step("envd", "the envd layer")
        envd = await envd_layer.ensure_envd_layer(self.root)
        progress.step("boot", " ".join(recipe.start_command)[:80])
        sandbox = await runtime.boot([etc_layer, envd, rootfs], list(recipe.start_command),
                                     SandboxConfig(env=recipe.env, resources=recipe.resources), template=recipe.name,
                                     cwd=recipe.workdir)
        try:
            await self._wait_ready(recipe, runtime, sandbox.id, sandbox.address, progress)
        except TemplateBuildFailed:
            log_tail = runtime.log_tail(sandbox.id, 20)
            await runtime.destroy(sandbox.id)
            shutil.rmtree(etc_layer, ignore_errors=True)
            raise TemplateBuildFailed(f"template {recipe.name!r} never became ready within "
                                      f"{recipe.ready.timeout_s:.0f}s; sandbox log:\n{log_tail}") from None
        progress.step("snapshot", "checkpointing memory and filesystem")
        await runtime.checkpoint(sandbox.id, tdir / key, leave_running=False)

    async def _wait_ready(self, recipe: Recipe, runtime: Runtime, sandbox_id: str, address: str,
                          progress: BuildProgress) -> None:
        check = recipe.ready
        deadline = time.monotonic() + check.timeout_s
        waiting_for = " ".join(check.command) if check.command else f"port {check.port}"
        progress.step("ready", f"waiting for {waiting_for} (up to {check.timeout_s:.0f} s)")
        while time.monotonic() < deadline:
            if check.command:
                result = await runtime.exec(sandbox_id, list(check.command), timeout=check.timeout_s)
                if result.exit_code == 0:
                    return
            elif await port_accepts(address, check.port or 0):
                return
            await asyncio.sleep(check.interval_s)
        raise TemplateBuildFailed("not ready")

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / "templates" / name, ignore_errors=True)


def _chroot_with_proc(root: Path, *argv: str) -> list[str]:
    """`chroot root argv` with /proc mounted inside, as some packages' install scripts need (OpenJDK's
    refuses to configure without it). The mount lives in a private mount namespace of this one command, so it
    is gone when the command ends, however it ends, and never shows on the host."""
    return ["unshare", "--mount", "--propagation", "private", "--fork", "/bin/sh", "-ec",
            'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"', str(root), *argv]


def _point_current(tdir: Path, key: str) -> None:
    """Points `current` at `key` atomically; a temporary name of this process's own, since another Corral
    process may point it at the same moment (both at the same key: the cache is keyed by its inputs)."""
    tmp = tdir / f".current.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(key)
    tmp.rename(tdir / "current")


async def _stream(argv: list[str], log, progress: BuildProgress, env: dict[str, str] | None = None) -> None:
    """Runs a build step, copying its output to the log and to `progress`, line by line."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})})
    tail: list[str] = []
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        log.write(line + "\n")
        tail = ([*tail, line])[-8:]
        if line:
            progress.output(line)
    rc = await proc.wait()
    log.flush()
    if rc != 0:
        raise TemplateBuildFailed(f"`{' '.join(argv[:4])}` exited with {rc}: " + " | ".join(tail[-4:]))


