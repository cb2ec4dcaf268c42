"""A real headless Chromium for the dashboard's tests: Debian's /usr/bin/chromium (CORRAL_TEST_TOOLS=1
scripts/install.sh installs it) driven by Playwright from PyPI, whose own browser downloads are never used.

    with chromium() as browser:                        # skips the test when chromium is not installed
        page = signed_in_page(browser, server.url, key)  # a new context (own cookies), signed in
        page.goto(dashboard(server.url, "/usage"))
        screenshot(page, "usage")                      # $CORRAL_DASHBOARD_SHOTS/usage.png
        csrf = csrf_token(page)                        # the session's token, to forge or send requests
        post_from_page(page, "/dashboard/sandboxes/<id>/kill", csrf)  # fetch() from the page: (status, text)

Screenshots go to $CORRAL_DASHBOARD_SHOTS (default /tmp/corral-dashboard-shots) for a person to look at.

A test module gets one Chromium for all its tests with `from tests.helpers.browser import browser_fixture`
(a module fixture named `browser`); `new_key(server, ...)` and `sdk_options(server, key)` make keys on a
tests.helpers.server.ServerProcess and the SDK's connection options for them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.browser_network import browser_network

SHOTS = Path(os.environ.get("CORRAL_DASHBOARD_SHOTS", "/tmp/corral-dashboard-shots"))
VIEWPORT = {"width": 1440, "height": 900}


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("Debian's chromium is not installed (CORRAL_TEST_TOOLS=1 scripts/install.sh installs it)")
    return path


@contextlib.contextmanager
def chromium(*args: str, own_network: bool = True) -> Iterator:
    """A headless Chromium (Playwright's Browser) with extra command-line `args`; closed after the block.
    It runs in a network namespace of its own whose loopback reaches the host's (tests.helpers.
    browser_network: the host's veths come and go with sandboxes, and Chromium fails requests in flight
    when they do), unless `own_network` is false."""
    from playwright.sync_api import sync_playwright

    with contextlib.ExitStack() as stack:
        executable = stack.enter_context(browser_network(chromium_path())) if own_network else chromium_path()
        playwright = stack.enter_context(sync_playwright())
        # --no-sandbox: the tests run as root, where Chromium's own sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=str(executable), args=["--no-sandbox", *args])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator:
    with chromium() as launched:
        yield launched


def new_key(server, *options: str, team: str | None = None) -> str:
    """A new API key of `server` (`corral keys create` options, e.g. "--scope", "read"), in `team`."""
    return json.loads(server.cli("keys", "create", "--json", *(["--team", team] if team else []), *options))["key"]


def sdk_options(server, api_key: str) -> dict:
    """The e2b SDK's keyword arguments to reach `server` with `api_key`."""
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": api_key}


def dashboard(base_url: str, path: str = "/sandboxes") -> str:
    return f"{base_url}/dashboard{path}"


def new_page(browser, *, color_scheme: str = "light"):
    """A page in a context of its own (its own cookies: one signed-in person), confirming every dialog
    (the dashboard asks before killing or revoking)."""
    context = browser.new_context(viewport=VIEWPORT, color_scheme=color_scheme, device_scale_factor=1)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    return page


def sign_in(page, base_url: str, key: str) -> None:
    page.goto(dashboard(base_url, "/signin"))
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/dashboard/sandboxes**")


def signed_in_page(browser, base_url: str, key: str, **options):
    page = new_page(browser, **options)
    sign_in(page, base_url, key)
    return page


def csrf_token(page) -> str:
    return json.loads(page.locator("body").get_attribute("hx-headers"))["X-CSRF-Token"]


def post_from_page(page, path: str, csrf: str | None, form: dict[str, str] | None = None) -> tuple[int, str]:
    """A POST as a script on the page would make it (same origin, the session's cookie), with the CSRF
    token as htmx sends it, or none: (status, text)."""
    return tuple(page.evaluate(
        """async ([path, csrf, form]) => {
            const headers = {"HX-Request": "true"};
            if (csrf !== null) headers["X-CSRF-Token"] = csrf;
            const answer = await fetch(path, {method: "POST", headers, body: new URLSearchParams(form)});
            return [answer.status, await answer.text()];
        }""", [path, csrf, form or {}]))


def screenshot(page, name: str, *, full_page: bool = True) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
