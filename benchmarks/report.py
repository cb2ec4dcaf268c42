"""Writes one benchmark's section of docs/benchmarks.md between its markers, replacing the previous run."""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_section(path: Path, name: str, body: str, command: str, heading: str | None = None) -> None:
    """With `heading`, the heading sits inside the markers; without, a `## Runtime`-style heading is
    added outside them the first time (the runtime benchmark's original layout)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    title = f"## {heading}\n\n" if heading else ""
    section = f"{begin}\n{title}Command: `{command}` — run {stamp} on {os.cpu_count()} cores.\n\n{body}\n{end}"
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    elif heading:
        text = text.rstrip() + "\n\n" + section + "\n"
    else:
        text += f"\n## {name.capitalize()}\n\n{section}\n"
    path.write_text(text)


def targets_table(rows: list[tuple[str, str, bool | str]]) -> list[str]:
    """The `| target | measured | verdict |` table: each row's verdict is met / NOT met, or a note."""
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for target, measured, verdict in rows:
        shown = ("met" if verdict else "**NOT met**") if isinstance(verdict, bool) else verdict
        lines.append(f"| {target} | {measured} | {shown} |")
    return lines
