"""What the desktop tests share: their server, a desktop, waiting, screenshots as images, pixel differences,
the editor's window."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator

from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b_desktop import Sandbox
from PIL import Image, ImageChops

from tests.helpers.server import ServerProcess


@contextlib.contextmanager
def desktop_server(harness, runtime, store, instance: str, network: str, *also: str) -> Iterator[ServerProcess]:
    """A `corral serve` of its own (no warm pool) once the `desktop` template (and `also`) is built; its log
    kept as <test root>/<instance>-serve.log."""
    for template in ("desktop", *also):
        harness.run(store.build(template, runtime), timeout=3600)
    proc = ServerProcess(instance, network, TEST_ROOT / instance, dns_upstream=DNS_HOST_ADDRESS, pool_size=0)
    with proc.serving(keep_log=TEST_ROOT / f"{instance}-serve.log"):
        yield proc


@contextlib.contextmanager
def new_desktop(opts: dict) -> Iterator[Sandbox]:
    """A desktop made by the SDK (its start-up included), without internet, killed afterwards."""
    sbx = Sandbox.create(allow_internet_access=False, timeout=300, **opts)
    try:
        yield sbx
    finally:
        sbx.kill()


def wait_until(check: Callable[[], object], timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def screenshot(desktop: Sandbox) -> Image.Image:
    return Image.open(io.BytesIO(bytes(desktop.screenshot()))).convert("RGB")


def changed_pixels(before: Image.Image, after: Image.Image) -> int:
    difference = ImageChops.difference(before, after).convert("L").point(lambda v: 255 if v > 16 else 0)
    return difference.histogram()[255]


def app_windows(desktop: Sandbox, application: str) -> list[str]:
    try:
        return [w for w in desktop.get_application_windows(application) if w]
    except Exception:  # xdotool exits 1 while there is none
        return []


def open_in_editor(desktop: Sandbox, path: str, content: str = "") -> str:
    """Opens `path` (with `content`) in the text editor and returns its window, focused."""
    desktop.files.write(path, content)
    desktop.launch("mousepad", path)
    (window,) = wait_until(lambda: app_windows(desktop, "mousepad"), what="the editor's window")
    wait_until(lambda: desktop.get_current_window_id() == window, what="the editor to have the focus")
    return window


def stream_diagnostics(desktop: Sandbox) -> str:
    """What the sandbox says of its stream's VNC server and noVNC proxy, for a failure's message."""
    script = ("echo '--- processes'; ps -eo pid,stat,etime,args | grep -E 'x11vnc|novnc|websockify' | grep -v grep; "
              "echo '--- listening'; ss -ltnp 2>/dev/null || netstat -ltnp; "
              "echo '--- x11vnc'; tail -c 3000 /tmp/x11vnc_stderr.log; echo '--- novnc'; tail -c 2000 /tmp/novnc.log; "
              "echo '--- ~/.vnc'; ls -la /home/user/.vnc")
    try:
        return desktop.commands.run(script, user="root", timeout=30).stdout
    except Exception as e:  # the failure's message matters more than this
        return f"(could not read them: {e})"
