"""The dashboard's templates pages in a real headless Chromium (tests/helpers/browser.py) against a real
`corral serve`, with a template built by the unmodified e2b SDK (`Template.build`): the templates page lists
it with its ready build and tag, the build's page shows the run step's output in its log, and a sandbox of a
template with a start command shows that command's output in its page's logs. Screenshots go to
$CORRAL_DASHBOARD_SHOTS (default /tmp/corral-dashboard-shots)."""

from __future__ import annotations

import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Sandbox, Template, wait_for_file

from tests.helpers.browser import (
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    dashboard,
    new_key,
    screenshot,
    sdk_options,
    signed_in_page,
)
from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t27", "10.254.0.0/22"


@pytest.fixture(scope="module")
def server(harness, runtime):
    """`runtime` is only needed so that `base` is built before the server starts."""
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=0)
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def sdk(server) -> dict:
    return sdk_options(server, new_key(server))


@pytest.fixture(scope="module")
def built(sdk):
    """A small template built with the SDK: (its BuildInfo, the log messages the SDK received)."""
    messages: list[str] = []
    # skip_cache: the step runs (and prints) every time, not only on the first run of a host's layer cache.
    template = Template().from_template("base").skip_cache().run_cmd("echo built-by-test")
    info = Template.build(template, "dashboard-built", tags=["v1"], on_build_logs=lambda e: messages.append(e.message),
                          **sdk)
    return info, messages


def test_the_templates_page_lists_a_built_template_with_its_ready_build_and_tag(server, browser, sdk, built):
    info, _ = built
    page = signed_in_page(browser, server.url, sdk["api_key"])
    page.goto(dashboard(server.url, "/templates"))
    card = page.get_by_role("article", name="dashboard-built")
    assert info.template_id in card.inner_text()
    build = card.locator(f'tr[data-build-id="{info.build_id}"]')
    assert build.locator(".badge").text_content() == "ready"
    assert "v1" in build.inner_text()
    assert "dashboard-built:v1" in card.locator(".tags").inner_text()
    screenshot(page, "templates")
    page.context.close()


def test_the_build_page_shows_the_run_steps_output(server, browser, sdk, built):
    info, messages = built
    assert any("built-by-test" in m for m in messages), messages  # what the SDK saw, for comparison
    page = signed_in_page(browser, server.url, sdk["api_key"])
    page.goto(dashboard(server.url, "/templates"))
    page.get_by_role("link", name=f"Log of build {info.build_id[:8]} of dashboard-built").click()
    page.wait_for_url(f"**/templates/{info.template_id}/builds/{info.build_id}")
    assert page.locator("#build-status").text_content() == "ready"
    page.locator("#build-following", has_text="finished").wait_for(timeout=15000)
    # The step's output line, not only the command's (`[1] RUN echo built-by-test`).
    assert "built-by-test" in page.locator("#log-lines li .msg").all_text_contents()
    assert "v1" in page.locator(".page-head").inner_text()
    screenshot(page, "template-build")
    page.context.close()


def test_a_sandbox_of_a_template_with_a_start_command_shows_its_output_in_the_logs(server, browser, sdk):
    template = (Template().from_template("base")
                .set_start_cmd("echo started-by-test; touch /tmp/ready; sleep infinity", wait_for_file("/tmp/ready")))
    Template.build(template, "dashboard-start-cmd", **sdk)
    sandbox = Sandbox.create("dashboard-start-cmd", timeout=120, **sdk)
    try:
        page = signed_in_page(browser, server.url, sdk["api_key"])
        page.goto(dashboard(server.url, f"/sandboxes/{sandbox.sandbox_id}"))
        line = page.locator('#log-lines li[data-source="start"]', has_text="started-by-test")
        line.wait_for(timeout=15000)
        page.context.close()
    finally:
        sandbox.kill()
