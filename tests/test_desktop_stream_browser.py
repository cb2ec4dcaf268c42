"""A desktop sandbox's live stream as a person sees it: a real headless Chromium on the host opens the URL
the unmodified e2b-desktop SDK gives (`stream.get_url()`: the noVNC page, its scripts and its WebSocket, all
through Corral's proxy) and what the browser shows is the sandbox's desktop, or noVNC's password prompt
when the URL has no auth key.

Chromium reaches the proxy as the SDK's URL names it (`6080-<id>.<domain>`), with `--host-resolver-rules`
mapping the domain to the server's loopback listener; the test server serves plain HTTP on its own port
(the HTTPS listener on 443 is for one module at a time, tests/test_public_urls_sdk.py), so the URL's scheme
and port are the listener's, its path and query the SDK's. Chromium is driven over its DevTools protocol:
`--headless --screenshot` takes its picture at the page's load event, before noVNC has connected, and a
virtual time budget runs the page's timers ahead of the WebSocket's real traffic.

The browser's screenshots are kept in /var/tmp/corral-test/t19-stream/ for a person to look at."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from conftest import TEST_ROOT
from e2b_desktop import Sandbox
from PIL import Image, ImageChops, ImageStat
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.helpers.desktop import desktop_server, screenshot, stream_diagnostics, wait_until
from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t19", "10.243.0.0/22"
CONNECTED = "document.documentElement?.classList.contains('noVNC_connected') === true"  # noVNC's own flag
TEMPLATE = "desktop"
SCREENSHOTS = TEST_ROOT / f"{INSTANCE}-stream"
SCREEN = (1024, 768)


# x11vnc's start in gVisor takes from 2 s to over a minute while the other xdist worker loads the host.
pytestmark = pytest.mark.alone

@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "Debian's chromium is not installed (CORRAL_TEST_TOOLS=1 scripts/install.sh installs it)"
        print(f"\nskipped: {reason}")
        pytest.skip(reason)
    return path


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


class DevToolsPage:
    """One page of a Chromium driven over the DevTools protocol's WebSocket: commands and their answers
    (events in between are not needed here and are dropped)."""

    def __init__(self, connection: ClientConnection) -> None:
        self._ws = connection
        self._ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        command_id = next(self._ids)
        self._ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=30))
            if message.get("id") != command_id:
                continue
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> Image.Image:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return Image.open(io.BytesIO(data)).convert("RGB")


def process_group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The fields after the command's name (in parentheses, which may hold spaces): state, ppid, pgrp.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@contextlib.contextmanager
def headless_chromium(chromium: str, domain: str) -> Iterator[DevToolsPage]:
    """A headless Chromium with a fresh profile that resolves every host under `domain` to the loopback
    address, and its first page. On the way out the browser and every process it started are gone (its
    own process group, killed and checked) and the profile is removed."""
    with (tempfile.TemporaryDirectory(prefix="corral-chromium-") as profile,
          open(Path(profile) / "chromium.log", "w") as log):
        browser = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox",  # Chromium's own sandbox refuses to run as root
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--no-proxy-server",
             f"--host-resolver-rules=MAP *.{domain} 127.0.0.1", f"--window-size={SCREEN[0]},{SCREEN[1]}",
             "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Chromium writes the port it chose for the DevTools protocol into the profile.
            active_port = Path(profile) / "DevToolsActivePort"
            wait_until(lambda: active_port.exists() and active_port.read_text().count("\n") >= 1, 30,
                       "Chromium's DevTools port")
            port = int(active_port.read_text().split()[0])
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            (target,) = [t for t in targets if t["type"] == "page"]
            with ws_connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as connection:
                page = DevToolsPage(connection)
                page.call("Emulation.setDeviceMetricsOverride", width=SCREEN[0], height=SCREEN[1],
                          deviceScaleFactor=1, mobile=False)
                yield page
        finally:
            # TERM lets the browser end and reap its renderers; whatever is left of its group is killed.
            browser.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                browser.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait(30)
            wait_until(lambda: not process_group_members(browser.pid), 10, "Chromium's processes to end")


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


def test_the_stream_url_with_its_auth_key_shows_the_desktop_in_a_browser(chromium, server, desktop, screenshots):
    key = desktop.stream.get_auth_key()
    url = desktop.stream.get_url(auth_key=key)
    assert url == (f"https://6080-{desktop.sandbox_id}.{server.domain}/vnc.html"
                   f"?autoconnect=true&resize=scale&password={key}")
    expected = screenshot(desktop)
    keep(expected, screenshots, "sdk-screenshot.png")
    with headless_chromium(chromium, server.domain) as page:
        page.call("Page.navigate", url=browser_url(url, server))
        # Null-safe: right after the navigation the page may have no document element yet.
        try:
            wait_until(lambda: page.evaluate(CONNECTED), 60, "noVNC to connect")
        except AssertionError as e:
            raise AssertionError(f"{e}; in the sandbox:\n{stream_diagnostics(desktop)}") from None

        differences = []

        def desktop_drawn() -> Image.Image | None:
            shown = page.screenshot()
            differences.append(round(thumbnail_difference(shown, expected), 1))
            return shown if differences[-1] < 12 else None

        try:
            shown = wait_until(desktop_drawn, 60, "the browser to show the desktop")
        finally:
            path = keep(page.screenshot(), screenshots, "stream-with-key.png")
            print(f"differences from the SDK's screenshot: {differences}")
    assert shown.size == SCREEN
    assert colours(shown) > 100, f"a nearly blank page: {path}"


def test_the_stream_url_without_the_auth_key_shows_only_the_password_prompt(chromium, server, desktop,
                                                                             screenshots):
    url = desktop.stream.get_url()
    assert "password" not in url
    expected = screenshot(desktop)
    with headless_chromium(chromium, server.domain) as page:
        page.call("Page.navigate", url=browser_url(url, server))
        # Null-safe: the page may still be about:blank.
        prompt_open = "document.getElementById('noVNC_credentials_dlg')?.classList.contains('noVNC_open')"
        wait_until(lambda: page.evaluate(prompt_open), 60, "noVNC's password prompt")
        time.sleep(2)  # a desktop, if the server sent one, would be drawn by now
        shown = page.screenshot()
        path = keep(shown, screenshots, "stream-without-key.png")
        assert not page.evaluate(CONNECTED)
    assert thumbnail_difference(shown, expected) > 30, f"the browser shows the desktop: {path}"

