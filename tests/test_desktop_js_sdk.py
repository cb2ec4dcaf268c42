"""Desktop sandboxes driven by the unmodified npm `@e2b/desktop` SDK: tests/js/desktop.mjs creates a desktop
against a real `corral serve`, drives its screen, keyboard, mouse, windows and stream, kills it, and
reports what it saw as JSON; each test here checks one behaviour in that report. The script runs once for
the module (a desktop takes seconds to create; every step works on the same one)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import TEST_ROOT
from PIL import Image

from tests.helpers.desktop import desktop_server
from tests.helpers.node import run_script

INSTANCE, NETWORK = "t20", "10.244.0.0/22"
TEMPLATE = "desktop"
OUTPUT = TEST_ROOT / f"{INSTANCE}-desktop-js"


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    with desktop_server(harness, runtime, store, INSTANCE, NETWORK) as proc:
        yield proc


@pytest.fixture(scope="module")
def run(server) -> dict:
    """The script's exit status, report and stderr, and the server and key it ran with. Its screenshots
    and the report stay in OUTPUT for a person to look at."""
    key = server.cli("keys", "create", "--name", "desktop-js").strip()
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    # E2B_DOMAIN only names the sandboxes' hosts (getHost, the stream's URL): the plain listener's create
    # answers no domain; requests go to E2B_SANDBOX_URL.
    env = {**os.environ, **server.sdk_env(key), "E2B_DOMAIN": server.domain}
    result = run_script("desktop.mjs", str(OUTPUT), env=env, timeout=600)
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    (OUTPUT / "report.json").write_text(json.dumps(report, indent=2))
    return {"returncode": result.returncode, "report": report, "stderr": result.stderr, "server": server,
            "key": key}


@pytest.fixture(scope="module")
def report(run) -> dict:
    return run["report"]


def test_js_desktop_script_runs_every_step_without_an_error(run):
    assert run["report"].get("error") is None, run["report"].get("error") or run["stderr"][-3000:]
    assert run["returncode"] == 0, run["stderr"][-3000:]


def test_js_screenshot_is_a_png_of_the_screen_size(report):
    assert report["screenSize"] == {"width": 1024, "height": 768}
    assert report["screenshot"]["signature"] == b"\x89PNG\r\n\x1a\n".hex()
    assert (report["screenshot"]["width"], report["screenshot"]["height"]) == (1024, 768)
    image = Image.open(io.BytesIO(Path(OUTPUT / "screenshot.png").read_bytes()))
    assert image.size == (1024, 768)
    # The desktop is drawn (wallpaper, panel), not a blank framebuffer.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 16


def test_js_mouse_moves_to_a_position_it_reports(report):
    assert report["cursor"] == {"x": 100, "y": 200}


def test_js_typing_into_the_editor_and_saving_writes_the_file(report):
    assert report["typed"] == "Typed by @e2b/desktop from Node.js, in chunks!"


def test_js_windows_are_listed_with_the_focused_one_and_its_title(report):
    windows = report["windows"]
    assert windows["mousepad"] == [windows["editor"]]
    assert windows["current"] == windows["editor"]
    assert "js-note.txt" in windows["title"]


def test_js_double_click_on_a_title_bar_maximizes_the_window(report):
    assert report["maximized"]["width"] == 1024


def test_js_left_click_on_a_window_gives_it_the_focus(report):
    click = report["clickFocus"]
    assert click["terminal"] != report["windows"]["editor"]
    assert click["focusedAfterClick"] == report["windows"]["editor"]


def test_js_stream_with_auth_has_the_key_in_its_url_and_serves_novnc_through_the_proxy(run, report):
    stream = report["stream"]
    assert stream["host"] == f"6080-{report['sandboxId']}.{run['server'].domain}"
    assert re.fullmatch(r"[A-Za-z0-9]{16}", stream["key"])
    assert stream["url"] == (f"https://{stream['host']}/vnc.html?autoconnect=true&resize=scale"
                             f"&password={stream['key']}")
    assert stream["urlWithoutKey"] == f"https://{stream['host']}/vnc.html?autoconnect=true&resize=scale"
    assert "-usepw" in stream["x11vnc"] and "-nopw" not in stream["x11vnc"]
    assert stream["page"] == {"status": 200, "noVNC": True}


def test_js_stream_cannot_start_twice(report):
    assert report["stream"]["startedTwice"] == "Stream is already running"


def test_js_stream_stop_ends_x11vnc_and_the_page(report):
    assert report["streamStopped"]["x11vnc"] == ""
    assert report["streamStopped"]["page"]["status"] == 502


def test_js_kill_ends_the_sandbox(run, report):
    assert report["runningAfterKill"] is False
    answer = httpx.get(f"{run['server'].url}/sandboxes/{report['sandboxId']}", headers={"X-API-Key": run["key"]})
    assert answer.status_code == 404
