"""`corral template build --dockerfile`, `ls`, `logs`, `rm` against a real server: the Dockerfile becomes a
template that the unmodified SDK starts sandboxes from (files, user, workdir, the CMD running); a failing
RUN fails the command naming its step; a multi-stage Dockerfile fails before anything reaches the server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox

from tests.helpers.server import CLI, ServerProcess

INSTANCE, NETWORK = "t14", "10.233.0.0/22"
NAME = "cli-app"

DOCKERFILE = """\
FROM base
ENV GREETING=hello
COPY hello.txt /opt/app/
COPY folder /opt/app/folder
RUN echo "$GREETING from $(whoami)" > /opt/app/greeting.txt
USER app
WORKDIR /opt/app
EXPOSE 8125
CMD ["python3", "-m", "http.server", "8125", "--directory", "/opt/app"]
"""


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=0)
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def opts(server) -> dict:
    key = server.cli("keys", "create", "--name", "template-cli").strip()
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def corral(opts: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    return subprocess.run([*CLI, "template", *args, "--url", opts["api_url"], "--api-key", opts["api_key"]],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def built(opts, tmp_path_factory) -> subprocess.CompletedProcess:
    """The one good build of this module: a context with a file, a folder and an ignored file."""
    context = tmp_path_factory.mktemp("context")
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "hello.txt").write_text("hello from the context\n")
    (context / "folder" / "sub").mkdir(parents=True)
    (context / "folder" / "a.txt").write_text("A\n")
    (context / "folder" / "sub" / "b.txt").write_text("B\n")
    (context / "folder" / "debug.log").write_text("ignored\n")
    (context / ".dockerignore").write_text("**/*.log\n")
    return corral(opts, "build", "--dockerfile", str(context / "Dockerfile"), "--name", NAME)


def test_dockerfile_build_makes_a_template_the_sdk_starts(opts, built):
    assert built.returncode == 0, built.stderr + built.stdout
    assert f"built {NAME}" in built.stdout
    assert "EXPOSE is not supported in a template and is ignored" in built.stderr
    assert "Starting: python3 -m http.server 8125 --directory /opt/app" in built.stdout  # the CMD, from the log
    sandbox = Sandbox.create(NAME, **opts)
    try:
        run = sandbox.commands.run
        assert run("cat /opt/app/hello.txt /opt/app/folder/a.txt /opt/app/folder/sub/b.txt").stdout == \
            "hello from the context\nA\nB\n"
        assert run("ls /opt/app/folder").stdout.split() == ["a.txt", "sub"]  # .dockerignore kept debug.log out
        assert run("cat /opt/app/greeting.txt").stdout == "hello from root\n"  # RUN ran as root, with the ENV
        assert run("id -un app && stat -c %U /opt/app").stdout == "app\napp\n"  # USER made it, WORKDIR is its
    finally:
        sandbox.kill()


def test_sandbox_runs_as_the_dockerfiles_user_in_its_workdir(opts, built):
    assert built.returncode == 0, built.stderr + built.stdout
    sandbox = Sandbox.create(NAME, **opts)
    try:
        assert sandbox.commands.run("whoami && pwd").stdout == "app\n/opt/app\n"
    finally:
        sandbox.kill()


def test_the_dockerfiles_cmd_runs_in_the_sandbox(opts, built):
    assert built.returncode == 0, built.stderr + built.stdout
    sandbox = Sandbox.create(NAME, **opts)
    try:
        assert "hello.txt" in sandbox.commands.run("curl -s http://127.0.0.1:8125/").stdout
    finally:
        sandbox.kill()


def test_logs_prints_the_build_log(opts, built):
    logs = corral(opts, "logs", NAME)
    assert logs.returncode == 0, logs.stderr
    assert "FROM template base" in logs.stdout and "greeting.txt" in logs.stdout
    assert logs.stdout.rstrip().endswith("ready")


def test_a_failing_run_fails_the_command_naming_the_step(opts, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN echo fine\nRUN echo about to fail >&2; exit 3\n")
    result = corral(opts, "build", "--dockerfile", str(tmp_path / "Dockerfile"), "--name", "cli-failing")
    assert result.returncode == 1
    assert "the build of cli-failing failed at step 4/6 (RUN echo about to fail >&2; exit 3)" in result.stderr
    assert "about to fail" in result.stdout  # the step's output, from the build log
    assert "Traceback" not in result.stderr


def test_a_multi_stage_dockerfile_fails_before_reaching_the_server(opts, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM golang AS build\nRUN go build\nFROM base\nCOPY --from=build /a /a\n")
    result = corral(opts, "build", "--dockerfile", str(tmp_path / "Dockerfile"), "--name", "cli-multi")
    assert result.returncode == 1
    assert "multi-stage Dockerfiles are not supported" in result.stderr
    listed = corral(opts, "ls", "--json")
    assert "cli-multi" not in [n for row in json.loads(listed.stdout) for n in row["names"]]


def test_ls_shows_templates_and_rm_removes_them(opts, built):
    listed = corral(opts, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["names"][0]: row for row in json.loads(listed.stdout)}
    assert rows[NAME]["buildStatus"] == "ready"
    assert NAME in corral(opts, "ls").stdout
    removed = corral(opts, "rm", NAME)
    assert removed.returncode == 0, removed.stderr
    assert NAME not in [row["names"][0] for row in json.loads(corral(opts, "ls", "--json").stdout)]
    again = corral(opts, "rm", NAME)
    assert again.returncode == 1 and f"template {NAME!r} not found" in again.stderr


def test_dockerfile_that_does_not_exist_is_a_clear_error(opts, tmp_path):
    result = corral(opts, "build", "--dockerfile", str(tmp_path / "nope" / "Dockerfile"))
    assert result.returncode == 1 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_builtin_build_still_needs_no_server(tmp_path):
    result = subprocess.run([*CLI, "template", "build", "--name", "x"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "name the built-in template to build" in result.stderr


def test_local_ls_lists_builtin_templates(runtime, settings):
    env = {**os.environ, "CORRAL_CACHE_DIR": str(settings.cache_dir)}
    result = subprocess.run([*CLI, "template", "ls", "--local", "--json"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "base" in [row["name"] for row in json.loads(result.stdout)]
