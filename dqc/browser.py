"""A headless browser (Chromium), when one is installed: a page's screenshot, and its DOM
after its scripts ran. Used by the demo (a picture of its QC page) and by the tests (the page
as a browser sees it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from dqc.io import atomic_write

#: Where Debian, Ubuntu and Google ship the browser.
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def _run(browser: str, args: list[str], page: str | Path, timeout: float) -> str:
    """Run the browser headless on `page`; its stdout. A failure or a timeout: RuntimeError."""
    with tempfile.TemporaryDirectory(prefix="dqc_browser_") as profile:
        try:
            done = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                 *args, Path(page).resolve().as_uri()],
                capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{browser} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{browser} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return done.stdout


def screenshot(page: str | Path, png: str | Path, browser: str | None = None,
               width: int = 1280, height: int = 2400, timeout: float = 60.0) -> Path | None:
    """A PNG of the page's top `height` pixels at `width`, written atomically; None when no
    browser is found; RuntimeError when it fails.

    Parameters
    ----------
    page, png: the HTML file and the picture to write.
    browser: the browser's path (default: `find_browser`).
    width, height: the window, in CSS pixels.
    """
    browser = browser or find_browser()
    if browser is None:
        return None
    atomic_write(png, lambda tmp: _run(browser, [f"--screenshot={tmp}",
                                                 f"--window-size={width},{height}"],
                                       page, timeout))
    return Path(png)


def dump_dom(page: str | Path, browser: str | None = None, timeout: float = 60.0) -> str:
    """The page's DOM as serialised after loading and running its scripts.

    Parameters
    ----------
    page: the HTML file.
    browser: the browser's path (default: `find_browser`; it must exist).
    """
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no Chromium-like browser on PATH")
    return _run(browser, ["--dump-dom", "--virtual-time-budget=10000"], page, timeout)
