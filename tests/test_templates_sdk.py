"""Templates built with the unmodified SDK (`from e2b import Template`): steps run in gVisor over cached
layers, COPY of uploaded files, users and workdirs as E2B has them, start and ready commands, then sandboxes
started from the result; names, tags, errors."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import (
    AsyncSandbox,
    AsyncTemplate,
    BuildException,
    Sandbox,
    Template,
    wait_for_file,
    wait_for_port,
    wait_for_process,
    wait_for_timeout,
    wait_for_url,
)

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t13", "10.229.0.0/22"
# The server's limit: builds here take seconds (12 s at most in a full run), the timeout test's one step minutes.
BUILD_TIMEOUT_S = 45


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=0,
                         extra_env={"CORRAL_BUILD_TIMEOUT_S": str(BUILD_TIMEOUT_S)})
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def opts(server) -> dict:
    key = server.cli("keys", "create", "--name", "templates").strip()
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


@pytest.fixture()
def context(tmp_path: Path) -> Path:
    """A build context: files, a folder, a glob's worth of files and symlinks of every kind."""
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
    return tmp_path


def _build(opts, template, name, **kwargs):
    lines: list = []
    info = Template.build(template, name, on_build_logs=lines.append, **opts, **kwargs)
    return info, [entry.message for entry in lines]


def test_steps_files_users_and_start_command_are_in_the_sandbox(opts, context):
    template = (
        Template(file_context_path=str(context))
        .from_template("base")
        .copy("hello.txt", "hello.txt")
        .copy("folder/*", "folder", force_upload=True)
        .copy("logs/*.log", "/opt/logs/", user="root", mode=0o640)
        .set_envs({"GREETING": "hi", "BUILD_ONLY": "yes"})
        .run_cmd("echo \"$GREETING from $(whoami) in $(pwd)\" > greeting.txt")
        .run_cmd("whoami > /tmp/root-was-here && id -u > /tmp/root-uid", user="root")
        .make_symlink(".bashrc", ".bashrc.local")
        .set_workdir("app")
        .run_cmd("pwd > where.txt && readlink /home/user/.bashrc.local > link.txt")
        .set_user("builder")
        .run_cmd("whoami > /home/builder/me.txt")
        .set_user("user")
        .set_start_cmd("python3 -m http.server 8123 --directory /home/user", wait_for_port(8123))
    )
    info, logs = _build(opts, template, "files-and-users")
    assert re.fullmatch(r"[a-z0-9]{20}", info.template_id)
    assert any("greeting.txt" in line for line in logs), logs[:20]

    sandbox = Sandbox.create("files-and-users", **opts)
    try:
        run = sandbox.commands.run
        assert run("cat /home/user/hello.txt").stdout == "hello from the context\n"
        assert run("cat /home/user/folder/a.txt /home/user/folder/b.txt").stdout == "A\nB\n"
        assert run("/home/user/folder/run.sh").stdout == "ran\n"
        links = run("cd /home/user/folder && readlink relative-link absolute-link dangling-link").stdout.split()
        assert links == ["a.txt", "/etc/hostname", "missing-target"]
        assert run("stat -c '%U %a' /home/user/folder/a.txt").stdout.strip() == "user 644"
        assert run("ls /opt/logs").stdout.split() == ["one.log", "two.log"]
        assert run("stat -c '%U %a' /opt/logs/one.log").stdout.strip() == "root 640"
        assert run("cat /home/user/greeting.txt").stdout == "hi from user in /home/user\n"
        assert run("cat /tmp/root-was-here /tmp/root-uid").stdout == "root\n0\n"
        assert run("cat /home/user/app/where.txt /home/user/app/link.txt").stdout == "/home/user/app\n.bashrc\n"
        assert run("cat /home/builder/me.txt").stdout == "builder\n"
        # The sandbox starts as the template's last user, in its last workdir.
        assert run("whoami && pwd").stdout == "user\n/home/user/app\n"
        # ENV is for the build only (as E2B documents).
        assert run("echo \"[$BUILD_ONLY]\"").stdout == "[]\n"
        # The start command was running when the template was snapshotted, and still is.
        served = run("curl -s http://127.0.0.1:8123/ || (ps aux; cat /var/log/corral/start.log)", user="root")
        assert "hello.txt" in served.stdout, served.stdout
        assert sandbox.get_info().template_id == info.template_id
    finally:
        sandbox.kill()


def test_each_ready_helper_gates_the_snapshot(opts):
    base = Template().from_template("base")
    cases = {
        "ready-url": base.set_start_cmd("python3 -m http.server 8124", wait_for_url("http://127.0.0.1:8124/")),
        "ready-process": Template().from_template("base").set_start_cmd("sleep 3600", wait_for_process("sleep")),
        "ready-file": Template().from_template("base").set_start_cmd("sleep 1 && touch /tmp/ready && sleep 3600",
                                                                     wait_for_file("/tmp/ready")),
        "ready-timeout": Template().from_template("base").set_start_cmd("echo started > /tmp/started; sleep 3600",
                                                                        wait_for_timeout(1000)),
    }
    for name, template in cases.items():
        _build(opts, template, name)
    sandbox = Sandbox.create("ready-url", **opts)
    try:
        assert sandbox.commands.run("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8124/").stdout == "200"
    finally:
        sandbox.kill()
    sandbox = Sandbox.create("ready-file", **opts)
    try:
        assert sandbox.commands.run("test -f /tmp/ready && pgrep -c sleep").exit_code == 0
    finally:
        sandbox.kill()


def test_a_rebuild_reruns_from_the_changed_step_and_skip_cache_reruns_all(opts):
    run_id = os.urandom(6).hex()  # the layer cache outlives test runs: start from steps it has never seen

    def template(last: str) -> Template:
        return (Template().from_template("base")
                .run_cmd(f"echo one > /tmp/one # {run_id}")
                .run_cmd("echo two > /tmp/two")
                .run_cmd(f"echo {last} > /tmp/last"))

    _build(opts, template("first"), "cached")
    started = time.monotonic()
    _, logs = _build(opts, template("second"), "cached")
    cached_rebuild = time.monotonic() - started
    assert sum("CACHED" in line for line in logs) == 2, logs
    assert any("RUN echo second" in line and "CACHED" not in line for line in logs)
    _, logs = _build(opts, template("second"), "cached", skip_cache=True)
    assert not any("CACHED" in line for line in logs), logs
    sandbox = Sandbox.create("cached", **opts)
    try:
        assert sandbox.commands.run("cat /tmp/one /tmp/two /tmp/last").stdout == "one\ntwo\nsecond\n"
    finally:
        sandbox.kill()
    assert cached_rebuild < 120  # generous: only that a cached rebuild does not redo everything slowly


def test_a_failing_run_fails_the_build_with_its_step_and_output(opts, server):
    template = (Template().from_template("base")
                .run_cmd("echo fine")
                .run_cmd("echo about to fail >&2; exit 3"))
    with pytest.raises(BuildException) as failure:
        _build(opts, template, "failing")
    assert "exit code 3" in str(failure.value)
    status = _last_status(server, opts, "failing")
    assert status["status"] == "error" and status["reason"]["step"] == "2"
    assert any("about to fail" in e["message"] for e in status["logEntries"])
    _assert_nothing_left_of(server, status)


def test_a_run_that_leaves_a_process_in_the_background_finishes(opts):
    template = Template().from_template("base").run_cmd("sleep 1000 & echo left running")
    started = time.monotonic()
    _, logs = _build(opts, template, "background-process")
    assert any("left running" in line for line in logs)
    assert time.monotonic() - started < 60  # generous: not the step's (or the build's) time limit


def test_run_as_an_unknown_user_fails_with_e2bs_message(opts):
    template = Template().from_template("base").run_cmd("whoami", user="root123")
    with pytest.raises(BuildException) as failure:
        _build(opts, template, "unknown-user")
    assert ("failed to run command 'whoami': command failed: unauthenticated: invalid username: 'root123'"
            in str(failure.value))


def test_unknown_base_template_is_a_build_error(opts):
    with pytest.raises(BuildException) as failure:
        _build(opts, Template().from_template("no-such-template"), "orphan")
    assert "no-such-template" in str(failure.value)


def test_names_tags_exists_and_delete(opts, server):
    template = Template().from_template("base").run_cmd("echo tagged > /tmp/tag")
    info, _ = _build(opts, template, "team-x/tagged:v1", tags=["stable"])
    assert sorted(info.tags) == ["stable", "v1"]
    assert Template.exists("team-x/tagged", **opts) is True
    assert Template.exists("base", **opts) is True
    assert Template.exists("never-built", **opts) is False
    tags = {t.tag for t in Template.get_tags("team-x/tagged", **opts)}
    assert {"stable", "v1"} <= tags
    assigned = Template.assign_tags("team-x/tagged:v1", ["prod"], **opts)
    assert assigned.tags == ["prod"]
    sandbox = Sandbox.create("team-x/tagged:prod", **opts)
    try:
        assert sandbox.commands.run("cat /tmp/tag").stdout == "tagged\n"
    finally:
        sandbox.kill()
    Template.remove_tags("team-x/tagged", ["prod"], **opts)
    assert "prod" not in {t.tag for t in Template.get_tags("team-x/tagged", **opts)}
    for bad in ("Upper", "a/b/c", "name:", "x:" + "0" * 8 + "-0000-0000-0000-" + "0" * 12):
        with pytest.raises(Exception) as error:
            Template.build(template, bad, **opts)
        assert "400" in str(error.value) or "invalid" in str(error.value).lower(), bad
    assert Sandbox.delete_snapshot(info.template_id, **opts) is True
    assert Template.exists("team-x/tagged", **opts) is False


def test_upload_urls_refuse_forged_and_expired_signatures(opts, server):
    headers = {"X-API-Key": opts["api_key"]}
    created = httpx.post(f"{server.url}/v3/templates", json={"name": "uploads"}, headers=headers).json()
    tid = created["templateID"]
    files_hash = "ab" * 32
    slot = httpx.get(f"{server.url}/templates/{tid}/files/{files_hash}", headers=headers)
    assert slot.status_code == 201 and slot.json()["present"] is False
    url = slot.json()["url"]
    assert httpx.put(url.replace("signature=", "signature=00"), content=b"x").status_code == 403
    expired = re.sub(r"expires=\d+", "expires=1", url)
    assert httpx.put(expired, content=b"x").status_code == 403
    assert httpx.put(url, content=b"not a tar").status_code == 201
    assert httpx.get(f"{server.url}/templates/{tid}/files/{files_hash}", headers=headers).json()["present"] is True


def test_packages_from_the_registries_install_in_steps(opts):
    """apt, pip and npm inside build steps reach the package registries the host reaches (through the
    operator's CA when the network intercepts TLS)."""
    template = (Template().from_template("base")
                .apt_install(["jq"], no_install_recommends=True)
                .pip_install(["six==1.17.0"])
                .npm_install(["left-pad@1.3.0"], g=True))
    _build(opts, template, "packages")
    sandbox = Sandbox.create("packages", **opts)
    try:
        run = sandbox.commands.run
        assert run("echo '{\"a\": 7}' | jq .a").stdout == "7\n"
        assert run("python3 -c 'import six; print(six.__version__)'").stdout == "1.17.0\n"
        assert run("npm ls -g left-pad").stdout.count("left-pad@1.3.0") == 1
        # Users' own installs inside the sandbox trust the same CAs.
        assert run("pip download --no-deps -d /tmp/dl six==1.17.0 >/dev/null && ls /tmp/dl").stdout.strip() \
            == "six-1.17.0-py2.py3-none-any.whl"
    finally:
        sandbox.kill()


def test_the_async_sdk_builds_and_starts_a_template(opts):
    async def scenario() -> str:
        template = AsyncTemplate().from_template("base").run_cmd("echo async > /tmp/made-by")
        await AsyncTemplate.build(template, "async-built", **opts)
        status = await AsyncTemplate.exists("async-built", **opts)
        sandbox = await AsyncSandbox.create("async-built", **opts)
        try:
            made = await sandbox.commands.run("cat /tmp/made-by")
        finally:
            await sandbox.kill()
        return f"{status} {made.stdout.strip()}"

    assert asyncio.run(scenario()) == "True async"


def test_build_in_background_reports_building_then_ready(opts):
    template = Template().from_template("base").run_cmd("sleep 2")
    info = Template.build_in_background(template, "background", **opts)
    first = Template.get_build_status(info, **opts)
    assert first.status.value == "building"
    deadline = time.monotonic() + 120
    status = first
    while status.status.value in ("building", "waiting") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = Template.get_build_status(info, logs_offset=0, **opts)
    assert status.status.value == "ready", status
    assert any("sleep 2" in entry.message for entry in status.log_entries)


def test_a_build_past_the_servers_time_limit_fails_and_leaves_nothing(opts, server):
    template = Template().from_template("base").run_cmd("sleep 600")
    started = time.monotonic()
    with pytest.raises(BuildException) as failure:
        _build(opts, template, "too-slow")
    assert f"limit of {BUILD_TIMEOUT_S}s" in str(failure.value)
    assert time.monotonic() - started < BUILD_TIMEOUT_S + 60
    _assert_nothing_left_of(server, _last_status(server, opts, "too-slow"))


def test_templates_of_one_key_are_invisible_to_another(opts, server):
    other = {**opts, "api_key": server.cli("keys", "create", "--name", "other-team").strip()}
    _build(opts, Template().from_template("base").run_cmd("echo mine > /tmp/owner"), "private-tpl")
    assert Template.exists("private-tpl", **opts) is True
    assert Template.exists("private-tpl", **other) is True  # E2B: 403 (exists, not yours) reads as True
    with pytest.raises(Exception) as refused:
        Sandbox.create("private-tpl", **other)
    assert "not found" in str(refused.value).lower()
    with pytest.raises(BuildException) as failure:  # nor can another key build on it
        _build(other, Template().from_template("private-tpl"), "stolen")
    assert "private-tpl" in str(failure.value)
    assert "private-tpl" not in httpx.get(f"{server.url}/templates", headers={"X-API-Key": other["api_key"]}).text


def test_builds_past_the_concurrency_limit_wait_for_a_slot(opts):
    infos = [Template.build_in_background(Template().from_template("base").run_cmd(f"sleep 4 # {n}"),
                                          f"queued-{n}", **opts) for n in range(3)]
    statuses = [Template.get_build_status(info, **opts).status.value for info in infos]
    assert statuses[:2] == ["building", "building"] and statuses[2] == "waiting", statuses
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        statuses = [Template.get_build_status(info, **opts).status.value for info in infos]
        if all(s in ("ready", "error") for s in statuses):
            break
        time.sleep(1)
    assert statuses == ["ready"] * 3


def _last_status(server, opts, name: str) -> dict:
    headers = {"X-API-Key": opts["api_key"]}
    listed = httpx.get(f"{server.url}/templates", headers=headers).json()
    entry = next(t for t in listed if name in t["names"])
    build = entry["buildID"]
    return httpx.get(f"{server.url}/templates/{entry['templateID']}/builds/{build}/status",
                     params={"limit": 1000}, headers=headers).json()


def _assert_nothing_left_of(server, status: dict) -> None:
    """A failed build leaves no scratch files, no half-made template and no build sandbox mounted."""
    cache = Path(server.env.get("CORRAL_CACHE_DIR", "/var/cache/corral"))
    assert not (cache / "build-work" / status["buildID"]).exists()
    assert not (cache / "templates" / status["templateID"] / status["buildID"]).exists()
    assert "build-work" not in Path("/proc/self/mountinfo").read_text()
