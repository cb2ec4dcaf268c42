"""The dashboard's sandbox, tree and templates pages in a real headless Chromium (tests/helpers/browser.py)
against a real `corral serve`, with sandboxes made and checked through the unmodified e2b SDK: the terminal
runs `echo` and shows its output; a file uploaded on the page is read back by the SDK (and downloaded from
the page); the tree page shows a fork's parent and its children; the sandbox page's charts render; the
templates page lists the built-in templates. Screenshots go to $CORRAL_DASHBOARD_SHOTS (default
/tmp/corral-dashboard-shots)."""

from __future__ import annotations

import time

import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.helpers.browser import (
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    dashboard,
    new_key,
    screenshot,
    sdk_options,
    signed_in_page,
)
from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t26", "10.253.0.0/22"


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_METRICS_INTERVAL_S": "1", "CORRAL_DASHBOARD_VNC_LINGER_S": "3"})
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-pages-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def key(server) -> str:
    return new_key(server)


@pytest.fixture
def sandbox(server, key):
    created = Sandbox.create(timeout=300, metadata={"purpose": "dashboard-pages"}, **sdk_options(server, key))
    try:
        yield created
    finally:
        created.kill()


def test_the_terminal_runs_echo_and_shows_its_output(server, browser, key, sandbox):
    page = signed_in_page(browser, server.url, key)
    page.goto(dashboard(server.url, f"/sandboxes/{sandbox.sandbox_id}"))
    page.get_by_role("button", name="Open a terminal").click()
    page.locator("#terminal-status", has_text="Connected").wait_for(timeout=15000)
    page.locator("#terminal .xterm-rows", has_text="$").wait_for(timeout=15000)  # the shell's prompt: it reads now
    page.locator("#terminal .xterm-helper-textarea").focus()
    page.keyboard.type("echo dashboard-$((6*7))\n")
    page.locator("#terminal .xterm-rows", has_text="dashboard-42").wait_for(timeout=15000)
    assert "dashboard-42" in page.locator("#terminal .xterm-rows").inner_text()
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "sandbox-terminal")
    page.keyboard.type("exit\n")
    page.locator("#terminal-status", has_text="exited with code 0").wait_for(timeout=15000)
    page.context.close()


def test_a_file_uploaded_on_the_page_is_read_by_the_sdk(server, browser, key, sandbox, tmp_path):
    page = signed_in_page(browser, server.url, key)
    page.goto(dashboard(server.url, f"/sandboxes/{sandbox.sandbox_id}"))
    page.locator("#files input[name=directory][value='/home/user']").wait_for(state="attached", timeout=15000)
    upload = tmp_path / "from-the-dashboard.txt"
    upload.write_text("uploaded through the dashboard\n")
    page.get_by_label("Upload a file to /home/user").set_input_files(str(upload))
    page.get_by_role("button", name="Upload", exact=True).click()
    page.get_by_text("Uploaded /home/user/from-the-dashboard.txt").wait_for(timeout=15000)
    assert sandbox.files.read("/home/user/from-the-dashboard.txt") == "uploaded through the dashboard\n"
    link = page.get_by_role("link", name="Download from-the-dashboard.txt")
    downloaded = page.request.get(server.url + link.get_attribute("href"))
    assert downloaded.status == 200 and downloaded.text() == "uploaded through the dashboard\n"
    page.context.close()


def test_the_sandbox_pages_charts_render_its_samples(server, browser, key, sandbox):
    sandbox.commands.run("head -c 20000000 /dev/urandom > /tmp/noise && sha256sum /tmp/noise")
    page = signed_in_page(browser, server.url, key)
    page.wait_for_timeout(3000)  # a few samples (the server samples every second here)
    page.goto(dashboard(server.url, f"/sandboxes/{sandbox.sandbox_id}"))
    for metric in ("cpu", "mem", "disk"):
        chart = page.locator(f'[data-metric="{metric}"]')
        chart.locator("canvas").wait_for(timeout=10000)
        assert chart.locator(".u-over").count() == 1
        assert page.locator(f'[data-metric-now="{metric}"]').inner_text().strip() != ""
    page.locator("#files tbody tr").first.wait_for(timeout=15000)
    screenshot(page, "sandbox")
    page.context.close()


def test_the_tree_page_shows_a_forks_parent_and_children(server, browser, key, sandbox):
    snapshot = sandbox.create_snapshot("before-fork")
    children = Sandbox.fork(sandbox.sandbox_id, count=2, timeout=120, **sdk_options(server, key))
    try:
        child_ids = [c.sandbox_id for c in children]
        page = signed_in_page(browser, server.url, key)
        page.goto(dashboard(server.url, f"/tree?focus={sandbox.sandbox_id}"))
        parent = page.locator(f'[data-node-id="{snapshot.snapshot_id}"]')
        assert "before-fork" in parent.inner_text()
        fork_point = page.locator(f'.node-card.fork[data-parent-id="{snapshot.snapshot_id}"]')
        assert fork_point.count() == 1
        at_fork = fork_point.locator("[data-sandbox-id]").evaluate_all("links => links.map(a => a.dataset.sandboxId)")
        assert sorted(at_fork) == sorted([sandbox.sandbox_id, *child_ids])
        screenshot(page, "tree")
        fork_point.get_by_role("button", name="Restore").click()
        page.locator("#flash", has_text="Started").wait_for(timeout=30000)
        started = page.locator("#flash").inner_text().split("Started ")[1].split(" from")[0]
        assert Sandbox.connect(started, **sdk_options(server, key)).commands.run("echo ok").stdout == "ok\n"
        Sandbox.kill(started, **sdk_options(server, key))
        page.context.close()
    finally:
        for child in children:
            if isinstance(child, Sandbox):
                child.kill()


def test_the_templates_page_lists_the_builtin_templates(server, browser, key):
    page = signed_in_page(browser, server.url, key)
    page.goto(dashboard(server.url, "/templates"))
    assert page.get_by_text("base", exact=True).first.is_visible()
    screenshot(page, "templates-builtin")
    page.context.close()


def test_the_desktop_view_shows_a_desktop_sandboxs_screen(server, browser, key):
    desktop = Sandbox.create(template="desktop", timeout=300, **sdk_options(server, key))
    try:
        page = signed_in_page(browser, server.url, key)
        # What the page saw, for the message if it does not connect (it failed that way twice in ~8 runs).
        seen: list[str] = []
        page.on("console", lambda m: seen.append(f"console {m.type}: {m.text}"))
        page.on("pageerror", lambda e: seen.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: seen.append(f"request failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and seen.append(f"answer {r.status}: {r.url}"))
        page.goto(dashboard(server.url, f"/sandboxes/{desktop.sandbox_id}"))
        try:
            page.get_by_role("button", name="Show the desktop").click()
            page.locator("#desktop[data-connected]").wait_for(timeout=30000)
        except PlaywrightTimeout:
            status = page.locator("#desktop-status").text_content()
            raise AssertionError(f"the desktop view did not connect; status {status!r}; {seen}") from None
        canvas = page.locator("#desktop canvas")
        assert canvas.evaluate("c => c.width") == 1024 and canvas.evaluate("c => c.height") == 768
        page.wait_for_timeout(1500)  # the first frame
        # Not one colour: the desktop's picture was drawn.
        colours = canvas.evaluate("""c => {
            const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const seen = new Set();
            for (let i = 0; i < data.length; i += 4 * 997) seen.add(data[i] + ',' + data[i + 1] + ',' + data[i + 2]);
            return seen.size;
        }""")
        assert colours > 5
        page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the full-page picture
        screenshot(page, "sandbox-desktop")
        assert _dashboard_vnc_servers(desktop) == 1
        page.context.close()
        # Its x11vnc stops once its last viewer has been gone for the linger (3 s here).
        deadline = time.monotonic() + 30
        while _dashboard_vnc_servers(desktop) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _dashboard_vnc_servers(desktop) == 0
    finally:
        desktop.kill()


def _dashboard_vnc_servers(sandbox: Sandbox) -> int:
    processes = sandbox.commands.run("ps -eo args", user="root").stdout.splitlines()
    # The program by its name: the template's /usr/local/bin/x11vnc wrapper execs /usr/bin/x11vnc.
    return sum(1 for p in processes if p.split(" ", 1)[0].rsplit("/", 1)[-1] == "x11vnc" and "-rfbport 5917" in p)
