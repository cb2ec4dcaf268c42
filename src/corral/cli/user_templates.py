"""`corral template build --dockerfile`, `ls`, `rm`, `logs`: templates users build on a server, through its
E2B template API (the same calls the SDK's `Template.build` makes).

A Dockerfile is converted here (templates/dockerfile.py), so a Dockerfile the server cannot build fails
before anything is uploaded; then each COPY's files are uploaded (once per content hash), the build is
started and followed until it is ready or fails.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from corral.cli.remote import Api, KeyOption, UrlOption
from corral.templates.dockerfile import DockerfileError, IgnoreRules, TemplateSpec, convert, write_archive

console = Console()
err_console = Console(stderr=True)

POLL_S = 0.5
PAGE = 100


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def default_name(dockerfile: Path) -> str:
    """A template name from the Dockerfile's directory: lower case, other characters as `-`."""
    name = re.sub(r"[^a-z0-9_-]+", "-", dockerfile.resolve().parent.name.lower()).strip("-")
    return name or "template"


def build_from_dockerfile(dockerfile: Path, name: str | None, context: Path | None, tags: list[str],
                          cpu: int | None, memory_mb: int | None, no_cache: bool, url: str | None,
                          api_key: str | None) -> None:
    try:
        text = dockerfile.read_text(encoding="utf-8")
    except OSError as e:
        _fail(f"cannot read {dockerfile}: {e.strerror}")
    context = context or dockerfile.parent
    if not context.is_dir():
        _fail(f"the build context {context} is not a directory")
    try:
        spec = convert(text, context)
    except DockerfileError as e:
        _fail(f"{dockerfile}: {e}")
    for warning in spec.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)
    name = name or default_name(dockerfile)
    api = Api(url, api_key)
    from_template = _is_template(api, spec.base)

    request: dict = {"name": name}
    if tags:
        request["tags"] = tags
    if cpu is not None:
        request["cpuCount"] = cpu
    if memory_mb is not None:
        request["memoryMB"] = memory_mb
    requested = api.call("POST", "/v3/templates", json=request).json()
    template_id, build_id = requested["templateID"], requested["buildID"]
    kind = "template" if from_template else "image"
    console.print(f"Template [bold]{escape(name)}[/bold] ({template_id}), build {build_id}, from {kind} "
                  f"{escape(spec.base)}", highlight=False, soft_wrap=True)
    _upload_files(api, template_id, spec, context)
    api.call("POST", f"/v2/templates/{template_id}/builds/{build_id}",
             json=spec.body(from_template=from_template, force=no_cache))
    started = time.monotonic()
    try:
        status = follow_build(api, template_id, build_id, spec)
    except KeyboardInterrupt:
        err_console.print(f"Stopped following; the build goes on on the server: corral template logs {name} "
                          f"--build {build_id} --follow", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if status["status"] != "ready":
        reason = status.get("reason") or {}
        where = _step_name(reason.get("step"), spec)
        _fail(f"the build of {name} failed{f' at {where}' if where else ''}: {reason.get('message', 'no reason given')}"
              f"\n(all of its log: corral template logs {name} --build {build_id})")
    console.print(f"[green]built[/green] {escape(name)} ({template_id}) in {time.monotonic() - started:.0f} s; "
                  f"start it with Sandbox.create({name!r})", highlight=False, soft_wrap=True)


def _is_template(api: Api, base: str) -> bool:
    """Whether FROM names a template the server has for this key (a built-in such as `base`, or one of the
    key's own) rather than an image."""
    try:
        answer = api.client.get(f"/templates/aliases/{quote(base, safe='')}")
    except httpx.TransportError as e:
        _fail(f"cannot reach {api.url}: {e} (is `corral serve` running?)")
    return answer.status_code == 200


def _upload_files(api: Api, template_id: str, spec: TemplateSpec, context: Path) -> None:
    ignore = IgnoreRules.of_context(context)
    done: set[str] = set()
    for step in spec.copies():
        src, files_hash = step["args"][0], step["filesHash"]
        if files_hash in done:
            continue
        done.add(files_hash)
        slot = api.call("GET", f"/templates/{template_id}/files/{files_hash}").json()
        if slot.get("present") or not slot.get("url"):
            console.print(f"  COPY {escape(src)}: files already on the server", highlight=False,
                          soft_wrap=True)
            continue
        with tempfile.TemporaryFile() as archive:
            write_archive(src, context, ignore, archive)
            size = archive.tell()
            archive.seek(0)
            console.print(f"  COPY {escape(src)}: uploading {size / 1024:.1f} KiB", highlight=False,
                          soft_wrap=True)
            headers = {k: v for k, v in (slot.get("headers") or {}).items() if k.lower() != "content-length"}
            try:
                # The URL authorises itself: no API key goes with the files, as with the SDK.
                with httpx.Client(timeout=3600, trust_env=False) as client:
                    answer = client.put(slot["url"], content=archive, headers=headers)
            except httpx.TransportError as e:
                _fail(f"uploading the files of COPY {src} failed: {e}")
        if answer.status_code >= 300:
            _fail(f"uploading the files of COPY {src} failed: {answer.status_code} {answer.text[:300]}")


def _step_name(step: str | None, spec: TemplateSpec | None) -> str:
    """`step 3/9 (RUN make)`, `the base`, `the start command`: where a log line or a failure belongs."""
    if not step:
        return ""
    if step == "base":
        return "the base" + (f" (FROM {spec.base})" if spec else "")
    if step == "finalize":
        return "the start/ready command"
    if spec is None or not step.isdigit() or not 1 <= int(step) <= len(spec.steps):
        return f"step {step}"
    found = spec.steps[int(step) - 1]
    return f"step {step}/{len(spec.steps)} ({found['type']} {' '.join(a for a in found['args'] if a)[:60]})"


class BuildFollower:
    """Shows a server build's log as it arrives: each line, and on a terminal a bar of the steps done."""

    def __init__(self, spec: TemplateSpec | None) -> None:
        self.spec = spec
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self) -> BuildFollower:
        if console.is_terminal:
            total = len(self.spec.steps) if self.spec else None
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("waiting for the build", total=total)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def entry(self, entry: dict) -> None:
        step, message = entry.get("step"), entry.get("message", "")
        stamp = _clock(entry.get("timestamp"))
        style = {"error": "red", "warn": "yellow"}.get(entry.get("level", ""), "")
        text = escape(message)
        console.print(f"[dim]{stamp}[/dim] " + (f"[{style}]{text}[/{style}]" if style else text),
                      highlight=False, soft_wrap=True)
        if self.progress is not None and step:
            done = int(step) - 1 if step.isdigit() else (0 if step == "base" else None)
            if step == "finalize" and self.spec:
                done = len(self.spec.steps)
            self.progress.update(self.task, description=escape(_step_name(step, self.spec)),
                                 **({"completed": done} if done is not None else {}))


def _clock(timestamp: str | None) -> str:
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S")
    except (AttributeError, ValueError):
        return "--:--:--"


def follow_build(api: Api, template_id: str, build_id: str, spec: TemplateSpec | None, *,
                 follow: bool = True) -> dict:
    """Prints the build's log from the start; with `follow`, until the build is ready or failed. Returns
    the last status answer."""
    offset = 0
    with BuildFollower(spec) as shown:
        while True:
            status = api.call("GET", f"/templates/{template_id}/builds/{build_id}/status",
                              params={"logsOffset": offset, "limit": PAGE}).json()
            entries = status.get("logEntries") or []
            for entry in entries:
                shown.entry(entry)
            offset += len(entries)
            finished = status["status"] in ("ready", "error")
            if not entries and (finished or not follow):
                return status  # the log is drained
            if len(entries) < PAGE:
                time.sleep(POLL_S)


# --- ls, rm, logs -------------------------------------------------------------------------------------


def template_ls_server(url: str | None, api_key: str | None, as_json: bool) -> None:
    rows = Api(url, api_key).call("GET", "/templates").json()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("name", "id", "status", "tags", "builds", "cpu", "memory", "updated")
    for r in rows:
        table.add_row(", ".join(r.get("names") or r.get("aliases") or []), r["templateID"], r.get("buildStatus") or "-",
                      ", ".join(r.get("tags") or []), str(r.get("buildCount", "")), str(r.get("cpuCount", "")),
                      f"{r.get('memoryMB', '')} MB", r.get("updatedAt", ""))
    console.print(table)


def template_rm(name: str = typer.Argument(..., help="Template name or id."), url: str = UrlOption,
                api_key: str = KeyOption) -> None:
    """Delete one of your templates (refused while a build runs or sandboxes run from it)."""
    api = Api(url, api_key)
    try:
        answer = api.client.delete(f"/templates/{quote(name, safe='')}")
    except httpx.TransportError as e:
        _fail(f"cannot reach {api.url}: {e} (is `corral serve` running?)")
    if answer.status_code == 404:
        _fail(f"template {name!r} not found")
    if answer.status_code >= 400:
        try:
            message = answer.json().get("message", answer.text)
        except ValueError:
            message = answer.text
        _fail(f"{answer.status_code}: {message}")
    console.print(f"removed {escape(name)}", highlight=False, soft_wrap=True)


def template_logs(name: str = typer.Argument(..., help="Template name or id."),
                  build: str = typer.Option(None, "--build", help="Build id (default: the template's current "
                                                                  "build, the one its name starts)."),
                  follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the build ends."),
                  url: str = UrlOption, api_key: str = KeyOption) -> None:
    """Print a template build's log."""
    api = Api(url, api_key)
    rows = api.call("GET", "/templates").json()
    row = next((r for r in rows if name == r["templateID"] or name in (r.get("names") or [])), None)
    if row is None:
        _fail(f"template {name!r} not found")
    build = build or row.get("buildID")
    if not build:
        _fail(f"template {name!r} has no builds")
    status = follow_build(api, row["templateID"], build, None, follow=follow)
    reason = status.get("reason") or {}
    console.print(f"build {build}: {status['status']}" + (f" ({reason.get('message')})" if reason else ""),
                  highlight=False, markup=False, soft_wrap=True)
