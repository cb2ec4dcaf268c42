"""`corral`: build templates, run sandboxes, check the host."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from corral import __version__
from corral.cli import remote, volume
from corral.cli.build_progress import BuildDisplay
from corral.cli.doctor import doctor_command
from corral.cli.local import local_runtime, start_template
from corral.cli.mcp import mcp_command
from corral.cli.record import record_app
from corral.cli.serve import serve_command
from corral.cli.teams import keys_app, teams_app, usage_command
from corral.cli.tree import sandbox_fork, sandbox_pause, sandbox_resume, sandbox_snapshot, tree_app
from corral.cli.user_templates import build_from_dockerfile, template_logs, template_ls_server, template_rm
from corral.runtime.base import Resources, RuntimeError_, SandboxConfig
from corral.templates.store import TemplateBuildFailed

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
template_app = typer.Typer(no_args_is_help=True, help="Templates: the built-in ones on this host (build NAME, "
                                                      "ls --local, prune) and your own on the server (build "
                                                      "--dockerfile, ls, rm, logs).")
sandbox_app = typer.Typer(no_args_is_help=True, help="Sandboxes: through the server's API (ls, create, info, "
                                                     "kill, exec, logs, pause, resume, snapshot, fork, record) or "
                                                     "directly on "
                                                     "this host (run).")
app.add_typer(template_app, name="template")
app.add_typer(sandbox_app, name="sandbox")
app.command("doctor")(doctor_command)
app.command("serve")(serve_command)
app.add_typer(keys_app, name="keys")
app.add_typer(teams_app, name="teams")
app.command("usage")(usage_command)
app.command("mcp")(mcp_command)
app.add_typer(tree_app, name="tree")
for _name, _command in (("ls", remote.sandbox_ls), ("create", remote.sandbox_create), ("info", remote.sandbox_info),
                        ("kill", remote.sandbox_kill), ("pause", sandbox_pause), ("resume", sandbox_resume),
                        ("snapshot", sandbox_snapshot), ("fork", sandbox_fork), ("logs", remote.sandbox_logs)):
    sandbox_app.command(_name)(_command)
sandbox_app.command("exec", context_settings={"allow_interspersed_args": False})(remote.sandbox_exec)
sandbox_app.add_typer(record_app, name="record")
template_app.command("rm")(template_rm)
template_app.command("logs")(template_logs)
volume_app = typer.Typer(no_args_is_help=True, help="Volumes: named storage of a fixed size that outlives "
                                                    "sandboxes (create, ls, rm).")
app.add_typer(volume_app, name="volume")
for _name, _command in (("create", volume.volume_create), ("ls", volume.volume_ls), ("rm", volume.volume_rm)):
    volume_app.command(_name)(_command)

console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"corral {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    pass


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@template_app.command("build")
def template_build(
        name: str = typer.Argument(None, help="Without --dockerfile: the built-in template to build on this host "
                                              "(base, code-interpreter-v1). With it: the new template's name."),
        force: bool = typer.Option(False, help="Built-in: rebuild even if a cached build exists."),
        dockerfile: Path = typer.Option(None, "--dockerfile", help="Build a template from this Dockerfile on the "
                                                                   "server (--url, --api-key)."),
        template_name: str = typer.Option(None, "--name", help="The template's name[:tag] (default: the "
                                                               "Dockerfile's directory name)."),
        context: Path = typer.Option(None, "--context", help="Directory COPY sources are taken from (default: "
                                                             "the Dockerfile's directory)."),
        tag: list[str] = typer.Option([], "--tag", help="Tag the build (repeatable; default: `default`)."),
        cpu: int = typer.Option(None, "--cpu", help="vCPUs of the template's sandboxes (server default 2)."),
        memory_mb: int = typer.Option(None, "--memory-mb", help="Memory of its sandboxes in MB (default 1024)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Rerun every step instead of reusing cached layers."),
        url: str = remote.UrlOption, api_key: str = remote.KeyOption) -> None:
    """Build a built-in template on this host (build base), or your own from a Dockerfile on the server."""
    if dockerfile is not None:
        if name and template_name and name != template_name:
            _fail(f"two names given ({name!r} and --name {template_name!r}); give one")
        build_from_dockerfile(dockerfile, template_name or name, context, tag, cpu, memory_mb, no_cache, url,
                              api_key)
        return
    if name is None:
        _fail("name the built-in template to build (e.g. `corral template build base`), or give --dockerfile")
    if template_name or context or tag or cpu or memory_mb or no_cache:
        _fail("--name, --context, --tag, --cpu, --memory-mb and --no-cache are for --dockerfile builds")

    async def run() -> None:
        async with local_runtime() as (runtime, store):
            with BuildDisplay(console, name) as display:
                info = await store.build(name, runtime, force=force, progress=display)
            console.print(f"[green]built[/green] {info.name} ({info.key}, {info.size_bytes / 2**20:.1f} MiB "
                          f"snapshot) at {info.snapshot}")

    try:
        asyncio.run(run())
    except (RuntimeError_, TemplateBuildFailed) as exc:
        _fail(str(exc))


@template_app.command("ls")
def template_ls(as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                local: bool = typer.Option(False, "--local", help="List the built-in templates built on this "
                                                                  "host instead (no server needed)."),
                url: str = remote.UrlOption, api_key: str = remote.KeyOption) -> None:
    """List your templates on the server, or (--local) the built-in ones built on this host."""
    if not local:
        template_ls_server(url, api_key, as_json)
        return
    from corral.config import load_settings
    from corral.templates.store import TemplateStore

    store = TemplateStore(load_settings())
    infos = store.list()
    if as_json:
        print(json.dumps([{"name": i.name, "key": i.key, "snapshot": str(i.snapshot), "size_bytes": i.size_bytes,
                           "built_at": i.built_at} for i in infos]))
        return
    table = Table("name", "key", "snapshot size", "built")
    for i in infos:
        table.add_row(i.name, i.key, f"{i.size_bytes / 2**20:.1f} MiB",
                      datetime.fromtimestamp(i.built_at).isoformat(timespec="seconds"))
    built = {i.name for i in infos}
    for name in sorted(set(store.recipes) - built):
        table.add_row(name, "-", "not built", f"corral template build {name}")
    console.print(table)


@template_app.command("prune")
def template_prune(
        data_dir: list[Path] = typer.Option(None, "--data-dir",
                                            help="A data directory whose sandboxes and checkpoints use this cache "
                                                 "(repeat for each; default: CORRAL_DATA_DIR)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Remove template builds (root filesystems, envd layers, snapshots) that nothing uses any more."""
    from corral.config import load_settings
    from corral.templates.prune import orphan_logs, remove, unused_builds

    settings = load_settings()
    entries = unused_builds(settings.cache_dir, data_dir or [settings.data_dir]) + orphan_logs(settings.cache_dir)
    freed = sum(e.size_bytes for e in entries) if dry_run else remove(entries)
    if as_json:
        print(json.dumps({"removed": [] if dry_run else [str(e.path) for e in entries],
                          "unused": [str(e.path) for e in entries], "bytes": freed, "dryRun": dry_run}))
        return
    table = Table("build", "size")
    for entry in entries:
        table.add_row(str(entry.path.relative_to(settings.cache_dir)), f"{entry.size_bytes / 2**20:.1f} MiB")
    console.print(table)
    verb = "would free" if dry_run else "freed"
    console.print(f"{len(entries)} unused build(s); {verb} {freed / 2**20:.1f} MiB")


@sandbox_app.command("run", context_settings={"allow_interspersed_args": False})
def sandbox_run(template: str = typer.Argument(..., help="Template to start from."),
                command: list[str] = typer.Argument(..., help="Command to run (after --)."),
                internet: bool = typer.Option(True, help="Allow egress to the internet."),
                memory_mb: int = typer.Option(512, help="Memory limit in MB."),
                vcpus: float = typer.Option(2, help="CPU limit in cores."),
                disk_mb: int = typer.Option(2048, help="Disk quota in MB."),
                user: str = typer.Option("user", help="Run as `user` (uid 1000) or `root`.")) -> None:
    """Create a sandbox, run one command in it, print its output and destroy it."""

    if command and command[0] == "--":
        command = command[1:]

    async def run() -> int:
        async with local_runtime() as (runtime, store):
            config = SandboxConfig(resources=Resources(vcpus=vcpus, memory_mb=memory_mb, disk_mb=disk_mb),
                                   internet=internet)
            sandbox = await start_template(runtime, store, template, config)
            try:
                home = "/root" if user == "root" else f"/home/{user}"
                script = command[0] if len(command) == 1 else shlex.join(command)
                result = await runtime.exec(sandbox.id, ["/bin/bash", "-lc", script],
                                            user=user, cwd=home,
                                            env={"HOME": home, "USER": user}, timeout=3600)
            finally:
                await runtime.destroy(sandbox.id)
            sys.stdout.buffer.write(result.stdout)
            sys.stderr.buffer.write(result.stderr)
            return result.exit_code

    try:
        code = asyncio.run(run())
    except RuntimeError_ as exc:
        _fail(str(exc))
    raise typer.Exit(code)
