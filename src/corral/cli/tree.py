"""`corral sandbox pause|resume|snapshot|fork` and `corral tree show|ls|meta|start|rm`: branching from the
command line, through the server's API."""

from __future__ import annotations

import json
from datetime import datetime

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree as RichTree

from corral.cli.remote import Api, JsonOption, KeyOption, UrlOption

console = Console()
tree_app = typer.Typer(no_args_is_help=True, help="The checkpoint tree: snapshots, pauses and forks and what "
                                                  "descends from them.")


def sandbox_pause(sandbox_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption,
                  filesystem_only: bool = typer.Option(False, "--filesystem-only",
                                                       help="Keep files only; processes restart on resume.")):
    """Pause a sandbox: it keeps its memory and files and uses no CPU or RAM until resumed."""
    body = {"memory": False} if filesystem_only else {}
    Api(url, api_key).call("POST", f"/sandboxes/{sandbox_id}/pause", json=body)
    print(f"paused {sandbox_id}")


def sandbox_resume(sandbox_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption,
                   timeout: int = typer.Option(None, help="Seconds until it times out again.")):
    """Resume a paused sandbox (or extend a running one's timeout)."""
    body = {"timeout": timeout} if timeout is not None else {}
    response = Api(url, api_key).call("POST", f"/v2/sandboxes/{sandbox_id}/connect", json=body)
    print(f"{'resumed' if response.status_code == 201 else 'running'} {sandbox_id}")


def sandbox_snapshot(sandbox_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption,
                     name: str = typer.Option(None, help="Name to create sandboxes from (moves to the newest)."),
                     meta: list[str] = typer.Option([], "--meta", help="key=value node metadata, repeatable.")):
    """Snapshot a sandbox (it keeps running) and print the snapshot id."""
    body: dict = {"name": name} if name else {}
    if meta:
        body["metadata"] = _parse_meta(meta)
    print(Api(url, api_key).call("POST", f"/sandboxes/{sandbox_id}/snapshots", json=body).json()["snapshotID"])


def sandbox_fork(sandbox_id: str = typer.Argument(...), count: int = typer.Option(1, help="Forks, 1-100."),
                 url: str = UrlOption, api_key: str = KeyOption,
                 timeout: int = typer.Option(None, help="Seconds the forks live."), as_json: bool = JsonOption):
    """Fork a running or paused sandbox into COUNT new ones; print their ids (or errors)."""
    body: dict = {"count": count}
    if timeout is not None:
        body["timeout"] = timeout
    results = Api(url, api_key).call("POST", f"/sandboxes/{sandbox_id}/fork", json=body).json()
    _print_started(results, as_json)


def _print_started(results: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=1))
        return
    for item in results:
        if "sandbox" in item:
            print(item["sandbox"]["sandboxID"])
        else:
            print(f"error {item['error']['code']}: {item['error']['message']}")


def _parse_meta(items: list[str]) -> dict:
    """key=value, the value parsed as JSON when it is (numbers for scores), else kept as a string."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _label(node: dict) -> str:
    when = datetime.fromtimestamp(node["createdAt"]).strftime("%Y-%m-%d %H:%M:%S")
    name = f" [bold]{node['name']}[/bold]" if node.get("name") else ""
    meta = " ".join(f"{k}={json.dumps(v)}" for k, v in (node.get("metadata") or {}).items())
    memory = "" if node["memory"] else " [dim](files only)[/dim]"
    label = f"[cyan]{node['id']}[/cyan]{name} {node['kind']} of {node['sandboxID']} {when} {_size(node['sizeBytes'])}"
    label += memory + (f" [yellow]{meta}[/yellow]" if meta else "")
    for sandbox in node.get("sandboxes", []):
        label += f"\n  [green]● {sandbox['sandboxID']}[/green] {sandbox['state']}"
    return label


@tree_app.command("show")
def tree_show(ref: str = typer.Argument(..., help="A checkpoint id or name, or a sandbox id."),
              url: str = UrlOption, api_key: str = KeyOption, as_json: bool = JsonOption):
    """Draw the lineage REF belongs to, from its root."""
    data = Api(url, api_key).call("GET", f"/checkpoints/{ref}/tree").json()
    if as_json:
        print(json.dumps(data, indent=1))
        return
    if not data["roots"]:
        console.print(f"{ref} has no checkpoints yet")
        return

    def add(parent, node: dict) -> None:
        branch = parent.add(_label(node))
        for child in node["children"]:
            add(branch, child)

    top = RichTree(f"lineage of {ref}: {_size(data['totalBytes'])} on disk")
    for root in data["roots"]:
        add(top, root)
    console.print(top)


@tree_app.command("ls")
def tree_ls(url: str = UrlOption, api_key: str = KeyOption, sandbox: str = typer.Option(None, help="Taken of it."),
            kind: str = typer.Option(None, help="snapshot, pause or fork."), as_json: bool = JsonOption):
    """List checkpoint nodes, newest first."""
    params = {k: v for k, v in {"sandboxID": sandbox, "kind": kind}.items() if v}
    nodes = Api(url, api_key).call("GET", "/checkpoints", params=params).json()
    if as_json:
        print(json.dumps(nodes, indent=1))
        return
    table = Table("id", "kind", "parent", "sandbox", "name", "size", "metadata")
    for n in nodes:
        table.add_row(n["id"], n["kind"], n["parentID"] or "", n["sandboxID"], n["name"] or "", _size(n["sizeBytes"]),
                      json.dumps(n["metadata"]) if n["metadata"] else "")
    console.print(table)


@tree_app.command("meta")
def tree_meta(ref: str = typer.Argument(...), pairs: list[str] = typer.Argument(..., help="key=value (JSON value "
                                                                                          "or text); key= removes."),
              url: str = UrlOption, api_key: str = KeyOption):
    """Set metadata on a node, e.g. `corral tree meta n123 score=0.82`."""
    patch = {k: (None if v == "" else v) for k, v in _parse_meta(pairs).items()}
    node = Api(url, api_key).call("PATCH", f"/checkpoints/{ref}", json={"metadata": patch}).json()
    print(json.dumps(node["metadata"]))


@tree_app.command("start")
def tree_start(ref: str = typer.Argument(...), count: int = typer.Option(1), url: str = UrlOption,
               api_key: str = KeyOption, timeout: int = typer.Option(None), as_json: bool = JsonOption):
    """Start COUNT sandboxes from a node; print their ids."""
    body: dict = {"count": count}
    if timeout is not None:
        body["timeout"] = timeout
    _print_started(Api(url, api_key).call("POST", f"/checkpoints/{ref}/sandboxes", json=body).json(), as_json)


@tree_app.command("rm")
def tree_rm(ref: str = typer.Argument(...), subtree: bool = typer.Option(False, help="Also every node below."),
            url: str = UrlOption, api_key: str = KeyOption):
    """Delete a node (its children move up to its parent) or a whole subtree."""
    result = Api(url, api_key).call("DELETE", f"/checkpoints/{ref}", params={"subtree": str(subtree).lower()}).json()
    print(f"deleted {len(result['deleted'])} node(s), freed {_size(result['reclaimedBytes'])}"
          + (f", {_size(result['retainedBytes'])} kept while sandboxes use it" if result["retainedBytes"] else ""))
