"""`corral sandbox record start|stop|ls|download|keep|rm`: recordings of desktop sandboxes through the server's
API (docs/desktop.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from corral.cli.remote import Api, JsonOption, KeyOption, UrlOption, _fail, console

record_app = typer.Typer(no_args_is_help=True, help="Record a desktop sandbox's screen to an MP4 (start, stop, "
                                                    "ls, download, keep, rm).")


def _print(recording: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(recording, indent=1))
        return
    table = Table("field", "value", show_header=False)
    for k, v in recording.items():
        table.add_row(k, "" if v is None else str(v))
    console.print(table)


@record_app.command("start")
def record_start(sandbox_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption,
                 fps: int = typer.Option(10, help="Frames per second (1-30)."),
                 max_seconds: int = typer.Option(None, "--max-seconds", help="End on its own after this long "
                                                                             "(default: the server's limit)."),
                 max_mb: int = typer.Option(None, "--max-mb", help="... or at this size."),
                 keep: bool = typer.Option(False, "--keep", help="Keep it after the sandbox is killed."),
                 as_json: bool = JsonOption):
    """Start recording a sandbox's screen; prints the recording's id."""
    body: dict = {"fps": fps, "keep": keep}
    if max_seconds is not None:
        body["maxDurationSeconds"] = max_seconds
    if max_mb is not None:
        body["maxBytes"] = max_mb << 20
    started = Api(url, api_key).call("POST", f"/sandboxes/{sandbox_id}/recordings", json=body).json()
    print(json.dumps(started, indent=1) if as_json else started["recordingID"])


@record_app.command("stop")
def record_stop(target: str = typer.Argument(..., help="A recording's id, or a sandbox's id (its running "
                                                      "recording)."),
                url: str = UrlOption, api_key: str = KeyOption,
                output: Path = typer.Option(None, "--output", "-o", help="Also download the MP4 here."),
                as_json: bool = JsonOption):
    """Stop a recording; the server keeps the file (download it with -o or `download`)."""
    api = Api(url, api_key)
    recording_id = target
    if not target.startswith("rec_"):
        running = [r for r in api.call("GET", f"/sandboxes/{target}/recordings").json() if r["state"] == "recording"]
        if not running:
            _fail(f"sandbox {target} has no recording running")
        recording_id = running[0]["recordingID"]
    stopped = api.call("POST", f"/recordings/{recording_id}/stop").json()
    if output is not None and stopped["state"] == "ready":
        _download(api, recording_id, output)
    _print(stopped, as_json)


def _download(api: Api, recording_id: str, output: Path) -> None:
    response = api.call("GET", f"/recordings/{recording_id}/file")
    output.write_bytes(response.content)
    console.print(f"saved {len(response.content)} bytes to {output}")


@record_app.command("download")
def record_download(recording_id: str = typer.Argument(...), output: Path = typer.Option(
                        None, "--output", "-o", help="Where (default: <id>.mp4 here)."),
                    url: str = UrlOption, api_key: str = KeyOption):
    """Download a stopped recording's MP4."""
    _download(Api(url, api_key), recording_id, output or Path(f"{recording_id}.mp4"))


@record_app.command("ls")
def record_ls(sandbox_id: str = typer.Argument(None, help="Only this sandbox's."), url: str = UrlOption,
              api_key: str = KeyOption, as_json: bool = JsonOption):
    """List recordings (kept ones of killed sandboxes too)."""
    path = f"/sandboxes/{sandbox_id}/recordings" if sandbox_id else "/recordings"
    rows = Api(url, api_key).call("GET", path).json()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("id", "sandbox", "state", "keep", "started", "seconds", "MB")
    for r in rows:
        table.add_row(r["recordingID"], r["sandboxID"], r["state"], "yes" if r["keep"] else "", r["startedAt"],
                      f"{r['durationSeconds']:.1f}", f"{r['sizeBytes'] / (1 << 20):.1f}")
    console.print(table)


@record_app.command("keep")
def record_keep(recording_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption,
                keep: bool = typer.Option(True, "--keep/--no-keep", help="Outlive the sandbox, or go with it.")):
    """Keep a recording after its sandbox is killed (or, with --no-keep, let it go with the sandbox)."""
    Api(url, api_key).call("PATCH", f"/recordings/{recording_id}", json={"keep": keep})
    print(f"{recording_id}: {'kept' if keep else 'goes with its sandbox'}")


@record_app.command("rm")
def record_rm(recording_id: str = typer.Argument(...), url: str = UrlOption, api_key: str = KeyOption):
    """Delete a recording and its file."""
    Api(url, api_key).call("DELETE", f"/recordings/{recording_id}")
    print(f"deleted {recording_id}")
