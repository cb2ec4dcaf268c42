"""The web dashboard in a real headless Chromium (tests/helpers/browser.py) against a real `corral serve`,
with sandboxes made and checked through the unmodified e2b SDK: sign-in (and a wrong key refused), the live
table showing a new sandbox within 2 s and dropping it after a kill, kill, pause, resume and fork from the
page as the SDK then sees them, the usage charts drawn with data, a read-only key without action buttons
whose forged POSTs are refused, a POST without the CSRF token refused, and two teams each seeing only their
own sandboxes. Each page's screenshot is saved in $CORRAL_DASHBOARD_SHOTS (default
/tmp/corral-dashboard-shots) for a person to look at."""

from __future__ import annotations

import time

import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox

from tests.helpers.browser import (
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    csrf_token,
    dashboard,
    new_key,
    new_page,
    post_from_page,
    screenshot,
    sdk_options,
    sign_in,
    signed_in_page,
)
from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t28", "10.251.0.0/22"
SHOWN_WITHIN_S = 2.0  # issue 20: the table shows a sandbox the SDK created within 2 s


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_METERING_INTERVAL_S": "1"})
    with proc.serving(wait_pool=1, keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


def row(page, sandbox_id: str):
    return page.locator(f'tr[data-sandbox-id="{sandbox_id}"]')


def test_signing_in_with_a_key_opens_the_sandboxes_page_and_a_wrong_key_is_refused(server, browser):
    page = new_page(browser)
    page.goto(dashboard(server.url, "/sandboxes"))
    page.wait_for_url("**/dashboard/signin?next=/dashboard/sandboxes")
    screenshot(page, "signin")
    page.get_by_label("API key").fill("e2b_" + "0" * 40)
    page.get_by_role("button", name="Sign in").click()
    assert "That is not a valid API key" in page.get_by_role("alert").inner_text()
    sign_in(page, server.url, new_key(server))
    assert page.get_by_role("heading", name="Sandboxes").is_visible()
    page.context.close()


def test_the_table_shows_an_sdk_sandbox_within_2s_and_drops_it_after_kill(server, browser):
    key = new_key(server)
    page = signed_in_page(browser, server.url, key)
    sandbox = Sandbox.create(timeout=120, metadata={"purpose": "dashboard"}, **sdk_options(server, key))
    try:
        row(page, sandbox.sandbox_id).wait_for(timeout=SHOWN_WITHIN_S * 1000)
        assert "purpose=dashboard" in row(page, sandbox.sandbox_id).inner_text()
        page.wait_for_timeout(2500)  # a CPU and memory sample or two for the sparklines
        screenshot(page, "sandboxes")
    finally:
        sandbox.kill()
    row(page, sandbox.sandbox_id).wait_for(state="detached", timeout=SHOWN_WITHIN_S * 1000)
    page.context.close()


def test_kill_from_the_page_kills_the_sandbox_as_the_sdk_sees_it(server, browser):
    key = new_key(server)
    page = signed_in_page(browser, server.url, key)
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, key))
    try:
        row(page, sandbox.sandbox_id).get_by_role("button", name=f"Kill {sandbox.sandbox_id}").click()
        page.locator("#flash").get_by_text(f"Killed {sandbox.sandbox_id}.").wait_for()
        assert not sandbox.is_running()
        assert sandbox.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**sdk_options(server, key)).next_items()]
    finally:
        Sandbox.kill(sandbox.sandbox_id, **sdk_options(server, key))
    page.context.close()


def test_pause_then_resume_from_the_page_as_the_sdk_sees_it(server, browser):
    key = new_key(server)
    page = signed_in_page(browser, server.url, key)
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, key))
    try:
        sandbox.files.write("/tmp/kept.txt", "still here")
        row(page, sandbox.sandbox_id).get_by_role("button", name=f"Pause {sandbox.sandbox_id}").click()
        page.locator("#flash").get_by_text(f"Paused {sandbox.sandbox_id}").wait_for(timeout=60_000)
        assert Sandbox.get_info(sandbox.sandbox_id, **sdk_options(server, key)).state.value == "paused"
        page.locator(f'tr[data-sandbox-id="{sandbox.sandbox_id}"][data-state="paused"]').wait_for()
        screenshot(page, "sandboxes-paused")
        row(page, sandbox.sandbox_id).get_by_role("button", name=f"Resume {sandbox.sandbox_id}").click()
        page.locator("#flash").get_by_text(f"Resumed {sandbox.sandbox_id}.").wait_for(timeout=60_000)
        assert Sandbox.get_info(sandbox.sandbox_id, **sdk_options(server, key)).state.value == "running"
        again = Sandbox.connect(sandbox.sandbox_id, **sdk_options(server, key))
        assert again.files.read("/tmp/kept.txt") == "still here"
    finally:
        Sandbox.kill(sandbox.sandbox_id, **sdk_options(server, key))
    page.context.close()


def test_fork_from_the_page_makes_a_sandbox_the_sdk_lists_with_the_parents_files(server, browser):
    key = new_key(server)
    page = signed_in_page(browser, server.url, key)
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, key))
    forks: list[str] = []
    try:
        sandbox.files.write("/tmp/parent.txt", "from the parent")
        row(page, sandbox.sandbox_id).get_by_role("button", name=f"Fork {sandbox.sandbox_id}").click()
        message = page.locator("#flash").get_by_text(f"Forked {sandbox.sandbox_id} into")
        message.wait_for(timeout=60_000)
        forks = [s.sandbox_id for s in Sandbox.list(**sdk_options(server, key)).next_items()
                 if s.sandbox_id != sandbox.sandbox_id]
        assert len(forks) == 1 and forks[0] in message.inner_text()
        child = Sandbox.connect(forks[0], **sdk_options(server, key))
        assert child.files.read("/tmp/parent.txt") == "from the parent"
        row(page, forks[0]).wait_for()
    finally:
        for sandbox_id in [sandbox.sandbox_id, *forks]:
            Sandbox.kill(sandbox_id, **sdk_options(server, key))
    page.context.close()


def test_usage_charts_render_with_the_teams_usage(server, browser):
    key = new_key(server)
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, key))
    try:
        time.sleep(2.5)  # a metering interval or two (CORRAL_METERING_INTERVAL_S=1)
    finally:
        sandbox.kill()
    page = signed_in_page(browser, server.url, key)
    page.goto(dashboard(server.url, "/usage"))
    charts = page.locator("[data-chart] canvas")
    charts.first.wait_for()
    assert charts.count() == 2
    table = page.get_by_role("table", name="Cost per day by template: totals over the period")
    assert "base" in table.inner_text()
    screenshot(page, "usage")
    page.goto(dashboard(server.url, "/events"))
    page.locator("code.event-type", has_text="sandbox.lifecycle.killed").first.wait_for()
    screenshot(page, "events")
    page.context.close()


def test_a_read_only_key_sees_no_action_buttons_and_its_forged_posts_are_refused(server, browser):
    server.cli("teams", "create", "watchers")
    writer = new_key(server, team="watchers")
    reader = new_key(server, "--scope", "read", team="watchers")
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, writer))
    try:
        page = signed_in_page(browser, server.url, reader)
        row(page, sandbox.sandbox_id).wait_for()
        assert row(page, sandbox.sandbox_id).get_by_role("button").count() == 0
        status, text = post_from_page(page, f"/dashboard/sandboxes/{sandbox.sandbox_id}/kill", csrf_token(page))
        assert status == 403 and "lacks the &#39;sandboxes&#39; scope" in text
        assert sandbox.is_running()
        page.goto(dashboard(server.url, "/keys"))
        assert page.get_by_role("button", name="Create key").count() == 0
        screenshot(page, "keys-read-only")
        page.context.close()
    finally:
        sandbox.kill()


def test_a_post_without_the_csrf_token_is_refused(server, browser):
    key = new_key(server)
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, key))
    try:
        page = signed_in_page(browser, server.url, key)
        status, text = post_from_page(page, f"/dashboard/sandboxes/{sandbox.sandbox_id}/kill", None)
        assert status == 403 and "CSRF token" in text
        status, _ = post_from_page(page, f"/dashboard/sandboxes/{sandbox.sandbox_id}/kill", "forged")
        assert status == 403
        assert sandbox.is_running()
        page.context.close()
    finally:
        sandbox.kill()


def test_two_teams_each_see_only_their_own_sandboxes_and_keys(server, browser):
    server.cli("teams", "create", "red")
    server.cli("teams", "create", "blue")
    red, blue = new_key(server, "--name", "red-key", team="red"), new_key(server, "--name", "blue-key", team="blue")
    red_sandbox = Sandbox.create(timeout=120, **sdk_options(server, red))
    blue_sandbox = Sandbox.create(timeout=120, **sdk_options(server, blue))
    try:
        red_page, blue_page = signed_in_page(browser, server.url, red), signed_in_page(browser, server.url, blue)
        row(red_page, red_sandbox.sandbox_id).wait_for()
        row(blue_page, blue_sandbox.sandbox_id).wait_for()
        for page, foreign_sandbox, foreign_key in ((red_page, blue_sandbox, "blue-key"),
                                                   (blue_page, red_sandbox, "red-key")):
            for path in ("/sandboxes", "/usage", "/events", "/keys"):
                page.goto(dashboard(server.url, path))
                assert foreign_sandbox.sandbox_id not in page.content()
                assert foreign_key not in page.content()
        status, _ = post_from_page(blue_page, f"/dashboard/sandboxes/{red_sandbox.sandbox_id}/kill",
                                   csrf_token(blue_page))
        assert status == 404 and red_sandbox.is_running()
        red_page.context.close()
        blue_page.context.close()
    finally:
        red_sandbox.kill()
        blue_sandbox.kill()


def test_an_admin_key_creates_a_key_shown_once_that_the_sdk_can_use(server, browser):
    admin = new_key(server, "--scope", "admin", "--name", "owner")
    page = signed_in_page(browser, server.url, admin)
    page.goto(dashboard(server.url, "/keys"))
    page.get_by_label("Name", exact=True).fill("from-the-dashboard")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label("The new API key").input_value()
    screenshot(page, "keys-created")
    assert Sandbox.list(**sdk_options(server, secret)).next_items() == []
    page.context.close()


def test_pages_in_dark_mode(server, browser):
    key = new_key(server)
    page = signed_in_page(browser, server.url, key, color_scheme="dark")
    sandbox = Sandbox.create(timeout=120, metadata={"theme": "dark"}, **sdk_options(server, key))
    try:
        row(page, sandbox.sandbox_id).wait_for(timeout=SHOWN_WITHIN_S * 1000)
        page.wait_for_timeout(2500)
        screenshot(page, "sandboxes-dark")
    finally:
        sandbox.kill()
    page.context.close()


def tab_to(page, label: str, most: int = 80) -> list[str]:
    """Press Tab until the element named `label` has the focus; the names passed on the way."""
    passed = []
    for _ in range(most):
        page.keyboard.press("Tab")
        name = page.evaluate("() => { const e = document.activeElement;"
                             " return e.getAttribute('aria-label') || e.textContent.trim(); }")
        passed.append(name)
        if name == label:
            return passed
    raise AssertionError(f"Tab never reached {label!r}; it passed {passed}")


def focus_ring(page) -> str:
    """The focused element's outline, when the browser shows focus (:focus-visible)."""
    return page.evaluate("() => { const e = document.activeElement; const s = getComputedStyle(e);"
                         " return e.matches(':focus-visible') ? s.outlineStyle + ' ' + s.outlineWidth : 'none'; }")


def test_the_keyboard_reaches_a_rows_kill_button_and_kills_with_enter(server, browser):
    key = new_key(server)
    page = signed_in_page(browser, server.url, key)
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, key))
    try:
        row(page, sandbox.sandbox_id).wait_for()
        passed = tab_to(page, f"Kill {sandbox.sandbox_id}")
        for action in ("Pause", "Add 5 minutes to", "Fork", "Snapshot"):
            assert f"{action} {sandbox.sandbox_id}" in passed
        assert sandbox.sandbox_id in passed  # the link to its page
        assert focus_ring(page) == "solid 2px"
        page.wait_for_timeout(2500)  # the table's polls do not take the focus away
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == f"Kill {sandbox.sandbox_id}"
        page.keyboard.press("Enter")  # new_page confirms the dialog
        page.locator("#flash").get_by_text(f"Killed {sandbox.sandbox_id}.").wait_for()
        assert not sandbox.is_running()
    finally:
        Sandbox.kill(sandbox.sandbox_id, **sdk_options(server, key))
    page.context.close()


def test_the_keyboard_reaches_every_action_on_a_sandboxs_page(server, browser):
    key = new_key(server)
    page = signed_in_page(browser, server.url, key)
    sandbox = Sandbox.create(timeout=120, **sdk_options(server, key))
    try:
        sandbox.files.write("/home/user/notes.txt", "keyboard")
        page.goto(dashboard(server.url, f"/sandboxes/{sandbox.sandbox_id}"))
        page.get_by_role("link", name="Download notes.txt").wait_for(timeout=15000)
        passed = tab_to(page, "Download notes.txt")
        for name in ("Pause", "+5 min", "Fork", "Snapshot", "Kill", "Open a terminal", "Open"):
            assert name in passed, passed
        assert focus_ring(page) == "solid 2px"
        passed = tab_to(page, "Upload", most=10)
        assert focus_ring(page) == "solid 2px"
        page.keyboard.press("Shift+Tab")
        assert page.evaluate("document.activeElement.type") == "file"
    finally:
        sandbox.kill()
    page.context.close()
