"""What the desktop tests share: waiting, screenshots as images, pixel differences, the editor's window."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from e2b_desktop import Sandbox
from PIL import Image, ImageChops


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
