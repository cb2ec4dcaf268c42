"""Desktop sandboxes driven by the unmodified e2b-desktop SDK (`from e2b_desktop import Sandbox`): the
`desktop` template's screen, mouse, keyboard, windows and applications, and its live stream (the noVNC
page and its WebSocket) through Corral's proxy. Sandboxes here have no internet: the browser talks only
to a server inside its own sandbox."""

from __future__ import annotations

import io
import re
import socket
import struct

import httpx
import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from e2b import CommandExitException
from e2b_desktop import Sandbox
from PIL import Image
from websockets.sync.client import connect as ws_connect

from tests.helpers.desktop import (
    app_windows,
    changed_pixels,
    desktop_server,
    new_desktop,
    open_in_editor,
    screenshot,
    stream_diagnostics,
    wait_until,
)

INSTANCE, NETWORK = "t17", "10.239.0.0/22"
TEMPLATE = "desktop"


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    with desktop_server(harness, runtime, store, INSTANCE, NETWORK) as proc:
        yield proc


@pytest.fixture(scope="module")
def opts(server) -> dict:
    key = server.cli("keys", "create", "--name", "desktop").strip()
    # `domain` only names the sandboxes' hosts (get_host, the stream's URL); requests go to sandbox_url.
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key, "domain": server.domain}


@pytest.fixture()
def desktop(opts):
    with new_desktop(opts) as sbx:
        yield sbx


def screenshot_if_changed(desktop: Sandbox, before: Image.Image, pixels: int) -> Image.Image | None:
    """A new screenshot if at least `pixels` pixels differ from `before`."""
    after = screenshot(desktop)
    return after if changed_pixels(before, after) >= pixels else None


def window_geometry(desktop: Sandbox, window: str) -> tuple[int, int, int]:
    """x, y and width of the window's client area on the screen (xdotool's getwindowgeometry adds the frame
    to the position twice; xwininfo does not)."""
    out = desktop.commands.run(f"xwininfo -id {window}").stdout
    return tuple(int(re.search(rf"{label}:\s+(\d+)", out).group(1))
                 for label in ("Absolute upper-left X", "Absolute upper-left Y", "Width"))


def title_bar(desktop: Sandbox, window: str) -> tuple[int, int]:
    """A point on the window's title bar, which xfwm4 draws just above the client area."""
    x, y, _ = window_geometry(desktop, window)
    return x + 80, y - 12


# ------------------------------------------------------------------------------------------ the screen


def test_screenshot_is_a_png_of_the_screen_size(desktop):
    data = bytes(desktop.screenshot())
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    assert image.size == desktop.get_screen_size() == (1024, 768)
    # The desktop is drawn (wallpaper, panel), not a blank framebuffer.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 16


def test_screenshot_as_a_stream_is_a_png(desktop):
    data = b"".join(desktop.screenshot(format="stream"))
    assert Image.open(io.BytesIO(data)).size == (1024, 768)


def test_the_sdk_start_up_finds_the_running_desktop_once(desktop):
    """The snapshot's X server and session are the ones the SDK's own `Xvfb` and `startxfce4` found: no
    second server, window manager or desktop."""
    for name in ("Xvfb", "xfce4-session", "xfwm4", "xfdesktop", "xfce4-panel"):
        pids = desktop.commands.run(f"pgrep -x {name} || true").stdout.split()
        assert len(pids) == 1, f"{name}: {pids}"


def screenshot_servers(desktop: Sandbox) -> list[str]:
    return desktop.commands.run("pgrep -f '^/usr/libexec/corral/screenshot --serve' || true").stdout.split()


def test_another_resolution_gets_a_new_x_server_of_that_size(opts):
    sbx = Sandbox.create(resolution=(1280, 800), dpi=120, allow_internet_access=False, timeout=120, **opts)
    try:
        assert sbx.get_screen_size() == (1280, 800)
        # The snapshot's screenshot server ended with its X server; the first capture is taken without one
        # and starts one for the new server, which takes the next (of the new size too).
        assert Image.open(io.BytesIO(bytes(sbx.screenshot()))).size == (1280, 800)
        wait_until(lambda: len(screenshot_servers(sbx)) == 1, what="a screenshot server for the new X server")
        assert Image.open(io.BytesIO(bytes(sbx.screenshot()))).size == (1280, 800)
        assert sbx.commands.run("pgrep -x xfdesktop").exit_code == 0
    finally:
        sbx.kill()


def test_screenshots_are_served_and_a_dead_server_is_replaced(desktop):
    """The template's scrot hands captures to the screenshot server started with the session; with that
    server killed, scrot captures by itself, and the next server is started."""
    [server] = screenshot_servers(desktop)
    before = screenshot(desktop)
    desktop.commands.run(f"kill -9 {server}", user="root")
    wait_until(lambda: not screenshot_servers(desktop), what="the screenshot server gone")
    after = screenshot(desktop)
    assert after.size == before.size == (1024, 768)
    assert changed_pixels(before, after) < 1000  # the same screen (the clock may have moved)
    wait_until(lambda: len(screenshot_servers(desktop)) == 1, what="a new screenshot server")
    assert screenshot_servers(desktop) != [server]
    assert screenshot(desktop).size == (1024, 768)


def test_a_screenshot_is_written_with_the_callers_permissions(desktop):
    """The server runs as `user`, but writes into the file its caller opened: root may write into /root,
    `user` may not."""
    desktop.commands.run("scrot --pointer /root/shot.png", user="root", envs={"DISPLAY": ":0"})
    assert Image.open(io.BytesIO(bytes(desktop.files.read("/root/shot.png", format="bytes", user="root")))).size \
        == (1024, 768)
    with pytest.raises(CommandExitException) as raised:
        desktop.commands.run("scrot --pointer /root/denied.png", envs={"DISPLAY": ":0"})
    assert raised.value.exit_code == 1 and "Permission denied" in raised.value.stderr
    assert not desktop.files.exists("/root/denied.png", user="root")


# ---------------------------------------------------------------------------------- keyboard and editor


def test_typing_into_the_editor_and_saving_writes_the_file(desktop):
    open_in_editor(desktop, "/home/user/note.txt")
    desktop.write("Hello from e2b-desktop, typed in chunks of 25 characters!")
    desktop.press(["ctrl", "s"])
    wait_until(lambda: desktop.files.read("/home/user/note.txt").strip()
               == "Hello from e2b-desktop, typed in chunks of 25 characters!", 20, "the saved file")


def test_key_combinations_and_named_keys_reach_the_editor(desktop):
    open_in_editor(desktop, "/home/user/keys.txt", "replace me")
    desktop.press(["ctrl", "a"])        # select all: what is typed next replaces it
    desktop.write("first")
    desktop.press("enter")
    desktop.write("second")
    desktop.press("backspace")
    desktop.press(["ctrl", "s"])
    wait_until(lambda: desktop.files.read("/home/user/keys.txt") == "first\nsecon", 20, "the saved file")


def test_windows_are_listed_with_their_titles(desktop):
    window = open_in_editor(desktop, "/home/user/titled.txt", "x")
    assert desktop.get_current_window_id() in desktop.get_application_windows("mousepad")
    assert "titled.txt" in desktop.get_window_title(window)


# --------------------------------------------------------------------------------------------- mouse


def test_mouse_moves_to_a_position_it_reports(desktop):
    assert desktop.get_cursor_position() == (512, 384)  # X starts with the pointer in the middle
    desktop.move_mouse(100, 200)
    assert desktop.get_cursor_position() == (100, 200)


def test_left_click_on_the_applications_menu_opens_it(desktop):
    desktop.move_mouse(12, 12)  # the panel's first button, top left
    before = screenshot(desktop)
    desktop.left_click()
    after = wait_until(lambda: screenshot_if_changed(desktop, before, 5000), 20, "the menu to show")
    # The menu opens below the button.
    assert changed_pixels(before.crop((0, 30, 300, 400)), after.crop((0, 30, 300, 400))) > 5000
    desktop.press("escape")


def test_drag_selects_text_in_the_editor(desktop):
    """drag: move, mouse_press, move, mouse_release. From below the last line to the window's top left
    selects everything, which what is typed next replaces."""
    window = open_in_editor(desktop, "/home/user/drag.txt", "select all of this\nby dragging\n")
    x, y, _ = window_geometry(desktop, window)
    desktop.drag((x + 320, y + 400), (x + 1, y + 1))
    desktop.write("dragged")
    desktop.press(["ctrl", "s"])
    wait_until(lambda: desktop.files.read("/home/user/drag.txt") == "dragged", 20, "the saved file")


def test_double_click_on_a_title_bar_maximizes_the_window(desktop):
    window = open_in_editor(desktop, "/home/user/maximize.txt")
    desktop.double_click(*title_bar(desktop, window))
    wait_until(lambda: window_geometry(desktop, window)[2] == 1024, 10, "the window to fill the screen's width")


def test_right_click_on_the_desktop_opens_its_menu(desktop):
    desktop.move_mouse(700, 500)
    before = screenshot(desktop)
    desktop.right_click()
    wait_until(lambda: screenshot_if_changed(desktop, before, 5000), 20, "the desktop's menu to show")
    desktop.press("escape")


def test_scroll_moves_the_editor_view(desktop):
    open_in_editor(desktop, "/home/user/long.txt", "".join(f"line {n}\n" for n in range(400)))
    desktop.press(["ctrl", "home"])
    x, y, _ = window_geometry(desktop, desktop.get_current_window_id())
    desktop.move_mouse(x + 200, y + 200)
    before = screenshot(desktop)
    desktop.scroll("down", 10)
    scrolled = wait_until(lambda: screenshot_if_changed(desktop, before, 500), 10, "the view to scroll")
    desktop.scroll("up", 10)
    wait_until(lambda: changed_pixels(before, screenshot(desktop)) < changed_pixels(before, scrolled) / 10, 10,
               "the view to scroll back")


# -------------------------------------------------------------------------------------------- browser


def test_open_shows_a_page_served_in_the_sandbox_in_the_browser(desktop):
    desktop.files.write("/home/user/site/index.html",
                        "<html><head><title>Corral desktop page</title></head><body><h1>Hi</h1></body></html>")
    desktop.commands.run("python3 -m http.server 8000 --directory /home/user/site", background=True, timeout=0)
    wait_until(lambda: desktop.commands.run("curl -sf http://localhost:8000/ >/dev/null; echo $?").stdout.strip()
               == "0", 20, "the page server")
    desktop.open("http://localhost:8000/index.html")
    windows = wait_until(lambda: app_windows(desktop, "firefox"), 90, "the browser's window")
    wait_until(lambda: any("Corral desktop page" in desktop.get_window_title(w) for w in windows), 60,
               "the page's title on the browser window")


# --------------------------------------------------------------------------------------------- stream


def rfb_handshake(ws, password: str | None) -> tuple[int, int]:
    """An RFB 3.8 handshake over noVNC's WebSocket as a viewer makes it: the framebuffer's size, or
    PermissionError with the server's reason when it refuses the security or the password."""
    buffer = bytearray()

    def read(n: int) -> bytes:
        while len(buffer) < n:
            buffer.extend(ws.recv(timeout=30))
        data = bytes(buffer[:n])
        del buffer[:n]
        return data

    def reason() -> str:
        (length,) = struct.unpack(">I", read(4))
        return read(length).decode()

    assert read(12).startswith(b"RFB 003.")
    ws.send(b"RFB 003.008\n")
    (count,) = read(1)
    if count == 0:
        raise PermissionError(reason())
    offered = set(read(count))
    if password is None:
        if 1 not in offered:
            raise PermissionError(f"the server wants authentication (security types {sorted(offered)})")
        ws.send(bytes([1]))
    else:
        assert 2 in offered
        ws.send(bytes([2]))
        challenge = read(16)
        # VNC authentication: DES of the challenge, keyed by the password's first 8 bytes, each bit-reversed.
        key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
        encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # one key three times: single DES
        ws.send(encryptor.update(challenge) + encryptor.finalize())
    (result,) = struct.unpack(">I", read(4))
    if result != 0:
        raise PermissionError(reason())
    ws.send(bytes([1]))  # ClientInit: shared
    return struct.unpack(">HH", read(4))


def stream_host(desktop: Sandbox, server) -> str:
    host = desktop.get_host(6080)
    assert host == f"6080-{desktop.sandbox_id}.{server.domain}"
    return host


def open_vnc_websocket(server, host: str):
    """noVNC's WebSocket as the browser opens it from the stream URL's page, through Corral's proxy with
    host routing."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    return ws_connect(f"ws://{host}/websockify", sock=sock, subprotocols=["binary"], open_timeout=10,
                      max_size=None)


def test_stream_without_auth_serves_novnc_and_the_desktop_through_the_proxy(desktop, server):
    desktop.stream.start()
    host = stream_host(desktop, server)
    assert desktop.stream.get_url() == f"https://{host}/vnc.html?autoconnect=true&resize=scale"
    page = httpx.get(f"{server.url}/vnc.html", headers={"Host": host})
    assert page.status_code == 200 and "noVNC" in page.text
    assert httpx.get(f"{server.url}/app/ui.js", headers={"Host": host}).status_code == 200
    with open_vnc_websocket(server, host) as ws:
        assert rfb_handshake(ws, None) == (1024, 768)
    desktop.stream.stop()


def test_stream_with_auth_refuses_a_viewer_without_the_key(desktop, server):
    desktop.stream.start(require_auth=True)
    key = desktop.stream.get_auth_key()
    assert re.fullmatch(r"[A-Za-z0-9]{16}", key)
    host = stream_host(desktop, server)
    assert desktop.stream.get_url(auth_key=key) == (
        f"https://{host}/vnc.html?autoconnect=true&resize=scale&password={key}")
    try:
        with open_vnc_websocket(server, host) as ws, pytest.raises(PermissionError, match="authentication"):
            rfb_handshake(ws, None)
        with open_vnc_websocket(server, host) as ws, pytest.raises(PermissionError):
            rfb_handshake(ws, "wrongkey" + key[8:])
        with open_vnc_websocket(server, host) as ws:
            assert rfb_handshake(ws, key) == (1024, 768)
    except TimeoutError:
        raise AssertionError(f"x11vnc did not answer; in the sandbox:\n{stream_diagnostics(desktop)}") from None
    desktop.stream.stop()


def test_stream_stop_ends_it_and_it_can_start_again(desktop, server):
    desktop.stream.start()
    with pytest.raises(RuntimeError, match="already running"):
        desktop.stream.start()
    desktop.stream.stop()
    host = stream_host(desktop, server)
    wait_until(lambda: httpx.get(f"{server.url}/vnc.html", headers={"Host": host}).status_code == 502, 10,
               "the stream's port to close")
    assert desktop.commands.run("pgrep -x x11vnc || true").stdout.strip() == ""
    desktop.stream.start()
    assert httpx.get(f"{server.url}/vnc.html", headers={"Host": host}).status_code == 200
    desktop.stream.stop()


def test_stream_vnc_server_checks_at_most_1024_descriptors_per_viewer(desktop):
    """libvncserver calls fcntl() on every descriptor number below the soft RLIMIT_NOFILE before it accepts a
    viewer: with a sandbox's 1048576, its greeting took 1.5 s of CPU, and up to a minute on a busy host."""
    desktop.stream.start(require_auth=True)
    limits = desktop.commands.run("cat /proc/$(pgrep -x x11vnc)/limits").stdout
    soft_limit = int(re.search(r"^Max open files\s+(\d+)", limits, re.MULTILINE).group(1))
    assert soft_limit <= 1024, limits
    desktop.stream.stop()


def test_stream_auth_key_is_refused_when_auth_is_off(desktop):
    desktop.stream.start()
    with pytest.raises(RuntimeError, match="require_auth"):
        desktop.stream.get_auth_key()
    desktop.stream.stop()
