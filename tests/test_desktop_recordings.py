"""Desktop sandboxes beyond the SDK's calls: recordings of the screen (Corral's API and CLI,
control/recordings.py), and pause/resume and fork of a desktop with its windows. Sandboxes are made with
the unmodified e2b-desktop SDK; recordings are decoded on the host with PyAV."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import av
import httpx
import pytest
from conftest import TEST_ROOT
from e2b import Sandbox as BaseSandbox
from e2b_desktop import Sandbox
from PIL import Image

from tests.helpers.desktop import (
    app_windows,
    changed_pixels,
    desktop_server,
    new_desktop,
    open_in_editor,
    screenshot,
    wait_until,
)
from tests.helpers.server import CLI

INSTANCE, NETWORK = "t21", "10.246.0.0/22"
TEMPLATE = "desktop"
OUTPUT = TEST_ROOT / "desktop-recordings"


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    with desktop_server(harness, runtime, store, INSTANCE, NETWORK, "base") as proc:
        yield proc


@pytest.fixture(scope="module")
def key(server) -> str:
    return server.cli("keys", "create", "--name", "recordings").strip()


@pytest.fixture(scope="module")
def opts(server, key) -> dict:
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key, "domain": server.domain}


@pytest.fixture(scope="module")
def api(server, key):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120, trust_env=False) as client:
        yield client


@pytest.fixture()
def desktop(opts):
    with new_desktop(opts) as sbx:
        yield sbx


def start(api, sandbox_id: str, **body) -> dict:
    response = api.post(f"/sandboxes/{sandbox_id}/recordings", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def stop(api, recording_id: str) -> dict:
    response = api.post(f"/recordings/{recording_id}/stop")
    assert response.status_code == 200, response.text
    return response.json()


def download(api, recording_id: str, name: str) -> Path:
    response = api.get(f"/recordings/{recording_id}/file")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / name
    path.write_bytes(response.content)
    print(f"recording kept for a person to watch: {path}")
    return path


def frames(path: Path) -> tuple[float, list[Image.Image]]:
    """The video's duration in seconds and its decoded frames."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        images = [frame.to_image() for frame in container.decode(stream)]
        duration = float(container.duration / av.time_base) if container.duration else \
            float(images and stream.frames / (stream.average_rate or 1))
    return duration, images


# ------------------------------------------------------------------------------------------- recordings


def test_a_recorded_session_is_a_playable_mp4_of_its_length_whose_frames_change(api, desktop):
    recording = start(api, desktop.sandbox_id, fps=10)
    assert recording["state"] == "recording" and (recording["width"], recording["height"]) == (1024, 768)
    began = time.monotonic()
    open_in_editor(desktop, "/home/user/recorded.txt")
    desktop.write("Typed while the screen was being recorded.")
    window = desktop.get_current_window_id()
    desktop.commands.run(f"xdotool windowmove {window} 300 250")
    desktop.wait(1500)
    stopped = stop(api, recording["recordingID"])
    elapsed = time.monotonic() - began
    assert stopped["state"] == "ready" and stopped["error"] is None
    path = download(api, recording["recordingID"], "session.mp4")
    assert path.stat().st_size == stopped["sizeBytes"] > 0
    duration, images = frames(path)
    assert abs(duration - elapsed) < max(2.0, 0.15 * elapsed), (duration, elapsed)
    assert abs(stopped["durationSeconds"] - duration) < 0.5
    assert images[0].size == (1024, 768) and len(images) >= 5
    assert changed_pixels(images[0], images[-1]) > 2000  # the editor opened, text typed, the window moved


def test_a_recording_ends_on_its_own_at_its_length_limit(api, desktop):
    recording = start(api, desktop.sandbox_id, fps=5, maxDurationSeconds=2)
    time.sleep(5)
    stopped = stop(api, recording["recordingID"])
    assert stopped["state"] == "ready"
    assert 1.0 <= stopped["durationSeconds"] <= 2.6, stopped


def test_one_recording_at_a_time_and_no_file_until_it_stops(api, desktop):
    recording = start(api, desktop.sandbox_id)
    second = api.post(f"/sandboxes/{desktop.sandbox_id}/recordings", json={})
    assert second.status_code == 409 and "being recorded already" in second.json()["message"]
    early = api.get(f"/recordings/{recording['recordingID']}/file")
    assert early.status_code == 409 and "still running" in early.json()["message"]
    assert api.delete(f"/recordings/{recording['recordingID']}").status_code == 409
    listed = api.get(f"/sandboxes/{desktop.sandbox_id}/recordings").json()
    assert [r["recordingID"] for r in listed] == [recording["recordingID"]]
    stop(api, recording["recordingID"])
    again = stop(api, recording["recordingID"])  # stopping twice answers it as it is
    assert again["state"] == "ready"
    assert api.delete(f"/recordings/{recording['recordingID']}").status_code == 204
    assert api.get(f"/recordings/{recording['recordingID']}").status_code == 404


def test_bad_recording_requests_are_refused_with_the_reason(api, desktop, opts):
    for body, fragment in (({"fps": 0}, "fps"), ({"fps": 31}, "fps"), ({"maxDurationSeconds": 10 ** 9}, "limit"),
                           ({"display": "0; reboot"}, "display"), ({"colour": "red"}, "colour")):
        response = api.post(f"/sandboxes/{desktop.sandbox_id}/recordings", json=body)
        assert response.status_code == 400, (body, response.text)
        assert fragment in response.text
    assert api.post("/sandboxes/nope/recordings", json={}).status_code == 404
    assert api.get("/recordings/rec_0000000000000000").status_code == 404
    plain = BaseSandbox.create("base", timeout=60, **opts)  # no X server, no ffmpeg
    try:
        response = api.post(f"/sandboxes/{plain.sandbox_id}/recordings", json={})
        assert response.status_code == 409 and "ffmpeg" in response.json()["message"]
    finally:
        plain.kill()
    assert api.get(f"/sandboxes/{desktop.sandbox_id}/recordings").json() == []


def test_another_keys_recordings_are_not_found(api, server, desktop):
    recording = start(api, desktop.sandbox_id)
    other = server.cli("keys", "create", "--name", "other").strip()
    headers = {"X-API-Key": other}
    assert api.get(f"/recordings/{recording['recordingID']}", headers=headers).status_code == 404
    assert api.post(f"/recordings/{recording['recordingID']}/stop", headers=headers).status_code == 404
    assert api.get("/recordings", headers=headers).json() == []
    stop(api, recording["recordingID"])


def test_a_recording_goes_on_over_pause_and_resume(api, desktop, opts):
    recording = start(api, desktop.sandbox_id, fps=5)
    time.sleep(2)
    assert desktop.pause() is True
    paused_stop = api.post(f"/recordings/{recording['recordingID']}/stop")
    assert paused_stop.status_code == 409 and "paused" in paused_stop.json()["message"]
    Sandbox.connect(desktop.sandbox_id, **opts)
    time.sleep(2)
    stopped = stop(api, recording["recordingID"])
    assert stopped["state"] == "ready"
    duration, images = frames(download(api, recording["recordingID"], "over-pause.mp4"))
    assert duration >= 3.0 and images


def test_unkept_recordings_go_with_their_sandbox_and_kept_ones_stay(api, opts):
    sbx = Sandbox.create(allow_internet_access=False, timeout=300, **opts)
    kept = start(api, sbx.sandbox_id, keep=True)
    time.sleep(2)
    sbx.kill()  # a kept recording still running is stopped and collected first
    after = api.get(f"/recordings/{kept['recordingID']}").json()
    assert after["state"] == "ready" and after["durationSeconds"] > 1
    assert download(api, kept["recordingID"], "kept.mp4").stat().st_size > 0

    sbx = Sandbox.create(allow_internet_access=False, timeout=300, **opts)
    dropped = start(api, sbx.sandbox_id)
    stop(api, dropped["recordingID"])
    sbx.kill()
    assert api.get(f"/recordings/{dropped['recordingID']}").status_code == 404
    assert api.delete(f"/recordings/{kept['recordingID']}").status_code == 204


def test_the_cli_records_a_sandbox(server, desktop, tmp_path):
    def corral(*args: str) -> str:
        return subprocess.run([*CLI, "sandbox", "record", *args, "--url", server.url], env=server.env,
                              check=True, capture_output=True, text=True).stdout

    key = ["--api-key", server.cli("keys", "create", "--name", "cli").strip()]
    # The sandbox is another key's: the CLI's error is the API's 404.
    refused = subprocess.run([*CLI, "sandbox", "record", "start", desktop.sandbox_id, "--url", server.url, *key],
                             env=server.env, capture_output=True, text=True)
    assert refused.returncode == 1 and "404" in refused.stderr
    own = ["--api-key", desktop.connection_config.api_key]
    recording_id = corral("start", desktop.sandbox_id, "--fps", "5", *own).strip()
    assert recording_id.startswith("rec_")
    time.sleep(2)
    corral("stop", desktop.sandbox_id, "-o", str(tmp_path / "cli.mp4"), *own)  # by sandbox id: its recording
    duration, images = frames(tmp_path / "cli.mp4")
    assert duration > 1 and images
    listed = json.loads(corral("ls", desktop.sandbox_id, "--json", *own))
    assert [(r["recordingID"], r["state"]) for r in listed] == [(recording_id, "ready")]


# ------------------------------------------------------------------------------ pause, resume and fork


def test_a_paused_desktop_comes_back_with_its_window_and_unsaved_text(desktop, opts):
    window = open_in_editor(desktop, "/home/user/unsaved.txt")
    desktop.write("not saved yet")
    desktop.wait(500)
    before = screenshot(desktop)
    assert desktop.pause() is True
    resumed = Sandbox.connect(desktop.sandbox_id, **opts)
    assert window in app_windows(resumed, "mousepad")
    assert "unsaved.txt" in resumed.get_window_title(window)
    assert changed_pixels(before, screenshot(resumed)) < 500  # the same screen, text and all
    resumed.press(["ctrl", "s"])
    wait_until(lambda: resumed.files.read("/home/user/unsaved.txt") == "not saved yet", 20, "the saved text")


def test_forks_of_a_desktop_are_independent_desktops(desktop, api):
    open_in_editor(desktop, "/home/user/branch.txt")
    desktop.write("shared ")
    recording = start(api, desktop.sandbox_id, fps=5)  # the forks' copies of the recorder are ended
    forks = desktop.fork(count=2, timeout=120)
    try:
        assert all(isinstance(f, Sandbox) for f in forks), forks
        for fork, word in zip(forks, ("left", "right"), strict=True):
            fork.write(word)
            fork.press(["ctrl", "s"])
        for fork, word in zip(forks, ("left", "right"), strict=True):
            wait_until(lambda f=fork, w=word: f.files.read("/home/user/branch.txt") == f"shared {w}", 20,
                       f"the fork to save {word!r}")
        assert changed_pixels(screenshot(forks[0]), screenshot(forks[1])) > 0
        assert not desktop.files.exists("/home/user/branch.txt") or desktop.files.read("/home/user/branch.txt") == ""
        for fork in forks:
            assert fork.commands.run("pgrep -x ffmpeg || true").stdout.strip() == ""
        assert desktop.commands.run("pgrep -x ffmpeg").exit_code == 0
    finally:
        for fork in forks:
            if isinstance(fork, Sandbox):
                fork.kill()
        stop(api, recording["recordingID"])
