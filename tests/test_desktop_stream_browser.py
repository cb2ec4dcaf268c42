"""A desktop sandbox's live stream as a person sees it: a real headless Chromium on the host opens the URL
the unmodified e2b-desktop SDK gives (`stream.get_url()`: the noVNC page, its scripts and its WebSocket, all
through Corral's proxy) and what the browser shows is the sandbox's desktop, or noVNC's password prompt
when the URL has no auth key.

Chromium reaches the proxy as the SDK's URL names it (`6080-<id>.<domain>`), with `--host-resolver-rules`
mapping the domain to the server's loopback listener; the test server serves plain HTTP on its own port
(the HTTPS listener on 443 is for one module at a time, tests/test_public_urls_sdk.py), so the URL's scheme
and port are the listener's, its path and query the SDK's. Chromium runs in a network namespace of its own
(tests.helpers.browser), driven by Playwright.

The browser's screenshots are kept in /var/tmp/corral-test/t19-stream/ for a person to look at."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import TEST_ROOT
from e2b_desktop import Sandbox
from PIL import Image, ImageChops, ImageStat
from playwright.sync_api import Page

from tests.helpers.browser import chromium, chromium_path
from tests.helpers.desktop import desktop_server, screenshot, stream_diagnostics, wait_until
from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t19", "10.243.0.0/22"
CONNECTED = "document.documentElement?.classList.contains('noVNC_connected') === true"  # noVNC's own flag
TEMPLATE = "desktop"
SCREENSHOTS = TEST_ROOT / f"{INSTANCE}-stream"
SCREEN = (1024, 768)


@pytest.fixture(scope="module", autouse=True)
def chromium_installed() -> None:
    chromium_path()  # skips the module, saying why, without Debian's chromium


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    with desktop_server(harness, runtime, store, INSTANCE, NETWORK) as proc:
        yield proc


@pytest.fixture(scope="module")
def desktop(server):
    """One desktop for the module, its stream started with an auth key."""
    key = server.cli("keys", "create", "--name", "stream-browser").strip()
    sbx = Sandbox.create(allow_internet_access=False, timeout=600, api_url=server.url, sandbox_url=server.url,
                         api_key=key, domain=server.domain)
    try:
        sbx.stream.start(require_auth=True)
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture(scope="module")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


# --------------------------------------------------------------------------------------- the browser


@contextlib.contextmanager
def headless_chromium(domain: str) -> Iterator[Page]:
    """A page of a headless Chromium (tests.helpers.browser: Playwright, its own network namespace) that
    resolves every host under `domain` to the loopback address, at the desktop's size."""
    with chromium(f"--host-resolver-rules=MAP *.{domain} 127.0.0.1") as browser:
        context = browser.new_context(viewport={"width": SCREEN[0], "height": SCREEN[1]}, device_scale_factor=1)
        yield context.new_page()


def page_picture(page: Page) -> Image.Image:
    return Image.open(io.BytesIO(page.screenshot())).convert("RGB")


# ------------------------------------------------------------------------------------------- helpers


def browser_url(stream_url: str, server: ServerProcess) -> str:
    """The SDK's stream URL on the test server's plain listener: its host, path and query, the listener's
    scheme and port."""
    parts = urlsplit(stream_url)
    return urlunsplit(("http", f"{parts.hostname}:{server.port}", parts.path, parts.query, ""))


def colours(image: Image.Image) -> int:
    return len(image.getcolors(maxcolors=1 << 24))


def thumbnail_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean difference (0-255) of the two pictures shrunk to 64x48 in grey: small for the same screen drawn
    twice (a clock that moved, the pointer, scaling), large for another picture."""
    small = [image.convert("L").resize((64, 48), Image.Resampling.BOX) for image in (a, b)]
    return ImageStat.Stat(ImageChops.difference(*small)).mean[0]


def keep(image: Image.Image, directory: Path, name: str) -> Path:
    path = directory / name
    image.save(path)
    print(f"\nkept {path}")
    return path


# --------------------------------------------------------------------------------------------- tests


def test_the_stream_url_with_its_auth_key_shows_the_desktop_in_a_browser(server, desktop, screenshots):
    key = desktop.stream.get_auth_key()
    url = desktop.stream.get_url(auth_key=key)
    assert url == (f"https://6080-{desktop.sandbox_id}.{server.domain}/vnc.html"
                   f"?autoconnect=true&resize=scale&password={key}")
    expected = screenshot(desktop)
    keep(expected, screenshots, "sdk-screenshot.png")
    with headless_chromium(server.domain) as page:
        page.goto(browser_url(url, server), wait_until="commit")
        # Null-safe: right after the navigation the page may have no document element yet.
        try:
            wait_until(lambda: page.evaluate(CONNECTED), 60, "noVNC to connect")
        except AssertionError as e:
            raise AssertionError(f"{e}; in the sandbox:\n{stream_diagnostics(desktop)}") from None

        differences = []

        def desktop_drawn() -> Image.Image | None:
            shown = page_picture(page)
            differences.append(round(thumbnail_difference(shown, expected), 1))
            return shown if differences[-1] < 12 else None

        try:
            shown = wait_until(desktop_drawn, 60, "the browser to show the desktop")
        finally:
            path = keep(page_picture(page), screenshots, "stream-with-key.png")
            print(f"differences from the SDK's screenshot: {differences}")
    assert shown.size == SCREEN
    assert colours(shown) > 100, f"a nearly blank page: {path}"


def test_the_stream_url_without_the_auth_key_shows_only_the_password_prompt(server, desktop, screenshots):
    url = desktop.stream.get_url()
    assert "password" not in url
    expected = screenshot(desktop)
    with headless_chromium(server.domain) as page:
        page.goto(browser_url(url, server), wait_until="commit")
        # Null-safe: the page may still be about:blank.
        prompt_open = "document.getElementById('noVNC_credentials_dlg')?.classList.contains('noVNC_open')"
        wait_until(lambda: page.evaluate(prompt_open), 60, "noVNC's password prompt")
        time.sleep(2)  # a desktop, if the server sent one, would be drawn by now
        shown = page_picture(page)
        path = keep(shown, screenshots, "stream-without-key.png")
        assert not page.evaluate(CONNECTED)
    assert thumbnail_difference(shown, expected) > 30, f"the browser shows the desktop: {path}"

