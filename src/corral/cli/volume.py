"""`corral volume create|ls|rm`: volumes through the server's API (docs/volumes.md)."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from corral.cli.remote import Api, JsonOption, KeyOption, UrlOption, console


def volume_create(name: str = typer.Argument(..., help="Letters, digits, '_' and '-'."), url: str = UrlOption,
                  api_key: str = KeyOption,
                  size: int = typer.Option(None, "--size", help="Size in MB, fixed for the volume's life "
                                                                  "(default: the server's, 1024)."),
                  as_json: bool = JsonOption):
    """Create a volume and print its id (with --json, also its token for the content API)."""
    body: dict = {"name": name}
    if size is not None:
        body["sizeMB"] = size
    created = Api(url, api_key).call("POST", "/volumes", json=body).json()
    print(json.dumps(created, indent=1) if as_json else created["volumeID"])


def volume_ls(url: str = UrlOption, api_key: str = KeyOption, as_json: bool = JsonOption):
    """List your volumes."""
    api = Api(url, api_key)
    rows = api.call("GET", "/volumes").json()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("id", "name", "size (MB)")
    for row in rows:
        detail = api.call("GET", f"/volumes/{row['volumeID']}").json()
        table.add_row(row["volumeID"], row["name"], str(detail.get("sizeMB", "")))
    console.print(table)


def volume_rm(volume: str = typer.Argument(..., help="The volume's id or name."), url: str = UrlOption,
              api_key: str = KeyOption):
    """Delete a volume and everything in it (refused while a running or paused sandbox mounts it)."""
    Api(url, api_key).call("DELETE", f"/volumes/{volume}")
    print(f"deleted {volume}")
