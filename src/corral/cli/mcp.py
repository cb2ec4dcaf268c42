"""`corral mcp`: Corral's MCP server for agents (docs/mcp.md), over stdio for MCP clients that start it."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console


def mcp_command(
    api_url: str = typer.Option(None, envvar="E2B_API_URL", help="The Corral server's API (default "
                                                                 "https://api.$E2B_DOMAIN)."),
    api_key: str = typer.Option(None, envvar="E2B_API_KEY", help="The API key the tools act with (its "
                                                                 "team and scopes apply)."),
    domain: str = typer.Option(None, envvar="E2B_DOMAIN", help="The server's public domain, for preview URLs."),
) -> None:
    """Serve Corral's tools (create sandboxes, run commands and code, files, preview URLs, pause, resume,
    snapshot, fork, kill) to an MCP client over stdin/stdout."""
    from corral.mcp.server import build_server

    if not api_key:
        Console(stderr=True).print("[red]error:[/red] no API key: set E2B_API_KEY or pass --api-key")
        raise typer.Exit(2)
    if not api_url:
        if not domain:
            Console(stderr=True).print("[red]error:[/red] no server: set E2B_API_URL or E2B_DOMAIN")
            raise typer.Exit(2)
        api_url = f"https://api.{domain}"
    os.environ.pop("E2B_DEBUG", None)  # the SDK would talk to localhost instead
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request on the client's stderr
    build_server(api_url, api_key, domain).run("stdio")
