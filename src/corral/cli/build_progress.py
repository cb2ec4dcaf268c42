"""Shows a template build as it goes, for `corral serve` (first start) and `corral template build`.

On a terminal: a spinner with the current step, the time so far and the step's latest output line, and a
line per finished step with how long it took. Anywhere else (a log file, CI, `| tee`): one plain line per
step as it starts, no control codes and no per-line output (that is in the build log)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from corral.templates.store import BuildProgress


class BuildDisplay(BuildProgress):
    """A context manager around one template build; pass it to `TemplateStore.build(progress=...)`."""

    def __init__(self, console: Console, template: str, verb: str = "building") -> None:
        self.console = console
        self.template = template
        self.verb = verb
        self._live: Progress | None = None
        self._task: TaskID | None = None
        self._step: tuple[str, str, float] | None = None

    def __enter__(self) -> BuildDisplay:
        if self.console.is_terminal:
            self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  TextColumn("[dim]{task.fields[line]}"), console=self.console, transient=True)
            self._live.start()
            self._task = self._live.add_task(f"{self.verb} template [bold]{escape(self.template)}[/bold]", line="")
        else:
            self._plain(f"{self.verb} template {self.template}")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._step is not None:
            name, detail, started = self._step
            if exc_type is None:
                self._finished(name, detail, started)
            else:
                self._say(f"[red]✗[/red] {escape(name)} failed after {time.monotonic() - started:.0f} s",
                          f"{self.template}: {name} failed after {time.monotonic() - started:.0f} s")
        if self._live is not None:
            self._live.stop()

    def step(self, name: str, detail: str = "") -> None:
        if self._step is not None:
            self._finished(*self._step)
        self._step = (name, detail, time.monotonic())
        if self._live is not None and self._task is not None:
            self._live.update(self._task, line="", description=(
                f"[bold]{escape(self.template)}[/bold] {escape(name)}: {escape(detail[:60])}"))
        else:
            self._plain(f"{self.template}: {name}: {detail}" if detail else f"{self.template}: {name}")

    def output(self, line: str) -> None:
        if self._live is not None and self._task is not None:
            self._live.update(self._task, line=escape(line[:60]))

    def _finished(self, name: str, detail: str, started: float) -> None:
        if self._live is not None:
            self.console.print(f"  [green]✓[/green] {escape(name)}: {escape(detail[:60])} "
                               f"[dim]({time.monotonic() - started:.0f} s)[/dim]", highlight=False)

    def _say(self, rich_text: str, plain_text: str) -> None:
        if self._live is not None:
            self.console.print(f"  {rich_text}", highlight=False)
        else:
            self._plain(plain_text)

    def _plain(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
