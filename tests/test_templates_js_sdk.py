"""Templates built with the unmodified e2b JS SDK (npm) `Template`: copied files, folders, globs and
symlinks, users, workdirs and the start command in sandboxes started from the result; a failing step's
BuildError; cached rebuilds; background builds, exists and tags. The scenarios are in tests/js/templates.mjs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT

from tests.helpers.node import run_script
from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t16", "10.237.0.0/22"


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=0)
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def sdk_env(server) -> dict[str, str]:
    key = server.cli("keys", "create", "--name", "templates-js").strip()
    return {**os.environ, **server.sdk_env(key)}


@pytest.fixture()
def context(tmp_path: Path) -> Path:
    """A build context: a file, a folder with symlinks of every kind, a glob's worth of logs, and a folder
    with a subfolder."""
    (tmp_path / "hello.txt").write_text("hello from the context\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("A\n")
    (folder / "b.txt").write_text("B\n")
    (folder / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (folder / "run.sh").chmod(0o755)
    os.symlink("a.txt", folder / "relative-link")
    os.symlink("/etc/hostname", folder / "absolute-link")
    os.symlink("missing-target", folder / "dangling-link")
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("one.log", "two.log", "skip.txt"):
        (logs / name).write_text(name)
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "top.txt").write_text("top\n")
    (tmp_path / "tree" / "sub" / "c.txt").write_text("C\n")
    return tmp_path


def _scenario(sdk_env: dict[str, str], name: str, context: Path | str = ".") -> list[str]:
    result = run_script("templates.mjs", name, str(context), os.urandom(4).hex(), env=sdk_env, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return [line for line in result.stdout.splitlines() if line.startswith("ok ")]


def test_js_template_files_users_and_start_command_are_in_the_sandbox(sdk_env, context):
    assert _scenario(sdk_env, "files-users-and-start-command", context) == [
        "ok context from the caller", "ok build", "ok files", "ok symlinks", "ok users and workdir",
        "ok start command"]


def test_js_copy_of_a_folder_with_a_subfolder(sdk_env, context):
    assert _scenario(sdk_env, "folder-with-subfolder", context) == ["ok folder with a subfolder"]


def test_js_failing_run_gives_build_error_with_the_steps_message_and_line(sdk_env):
    assert _scenario(sdk_env, "failing-run") == ["ok build error"]


def test_js_rebuild_shows_cached_steps(sdk_env):
    assert _scenario(sdk_env, "cached-rebuild") == ["ok cached steps", "ok rebuilt template"]


def test_js_build_in_background_status_exists_and_tags(sdk_env):
    assert _scenario(sdk_env, "background-and-tags") == [
        "ok build in background", "ok exists", "ok tags"]
