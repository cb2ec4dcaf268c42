"""`corral serve` and `corral keys`: the API server and its API keys."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime

import typer
from rich.console import Console
from rich.table import Table

from corral.config import PlatformSettings, load_settings

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
console = Console()


def _keys():
    from corral.control.db import open_database
    from corral.control.keys import ApiKeys

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return ApiKeys(open_database(PlatformSettings().resolved_database_url(settings)))


def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for remote clients)."),
    port: int = typer.Option(3000, help="Port for the API and the sandbox proxy."),
    domain: str = typer.Option(None, help="Also route Host `<port>-<sandboxID>.<domain>` to sandboxes."),
    pool_size: int = typer.Option(None, help="Warm sandboxes kept per pooled template (CORRAL_POOL_SIZE)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the E2B-compatible API and the sandbox proxy on one listener."""
    import dataclasses

    import uvicorn

    from corral.server import CorralServer

    settings = load_settings()
    platform = PlatformSettings()
    if pool_size is not None:
        platform = dataclasses.replace(platform, pool_size=pool_size)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_templates(settings, platform.pool_templates or ("base",))
    server = CorralServer(settings, platform, domain=domain)
    key_line = "export E2B_API_KEY=<a key from `corral keys create`>"
    if not asyncio.run(server.keys.list()):
        _, secret = asyncio.run(server.keys.create("default"))
        key_line = f"export E2B_API_KEY={secret}   # created now as 'default'; shown only once"
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    console.print("[bold]Point the E2B SDKs at this server:[/bold]")
    print(f"export E2B_API_URL=http://{shown}:{port}\nexport E2B_SANDBOX_URL=http://{shown}:{port}\n{key_line}",
          flush=True)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(server, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                timeout_keep_alive=300, timeout_graceful_shutdown=5, ws="websockets-sansio")


def _ensure_templates(settings, names: tuple[str, ...]) -> None:
    """Builds the templates the server pools (`base` by default) when they are missing or their recipe
    changed (an upgrade): the first start on a fresh machine takes about a minute, later ones none."""
    from corral.cli.build_progress import BuildDisplay
    from corral.cli.local import local_runtime
    from corral.runtime.base import TemplateNotFound

    async def build() -> None:
        async with local_runtime(settings) as (runtime, store):
            for name in names:
                if name not in store.recipes:
                    continue
                try:
                    store.resolve(name)
                    verb = "" if await store.is_current(name, runtime) else "rebuilding out-of-date"
                except TemplateNotFound:
                    verb = "building"
                if not verb:
                    continue
                with BuildDisplay(console, name, verb) as display:
                    await store.build(name, runtime, progress=display)
                console.print(f"[green]built[/green] template {name}")

    asyncio.run(build())


@keys_app.command("create")
def keys_create(name: str = typer.Option("default", help="A name to tell keys apart."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    key, secret = asyncio.run(_keys().create(name))
    if as_json:
        print(json.dumps({"id": key.id, "name": key.name, "key": secret}))
    else:
        print(secret)


@keys_app.command("ls")
def keys_ls(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List API keys (never the keys themselves)."""
    keys = asyncio.run(_keys().list())
    if as_json:
        print(json.dumps([{"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at,
                           "revoked": k.revoked_at is not None} for k in keys]))
        return
    table = Table("id", "name", "key starts", "created", "state")
    for k in keys:
        table.add_row(k.id, k.name, k.prefix + "…", datetime.fromtimestamp(k.created_at).isoformat(" ", "seconds"),
                      "revoked" if k.revoked_at else "active")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (see `corral keys ls`).")) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    from corral.control.keys import KeyNotFound

    try:
        key = asyncio.run(_keys().revoke(key_id))
    except KeyNotFound:
        Console(stderr=True).print(f"[red]error:[/red] no API key with id {key_id}")
        raise typer.Exit(1) from None
    print(f"revoked {key.id} ({key.name})")
