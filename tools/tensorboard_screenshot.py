"""Make docs/images/tensorboard.png: a short real run with ``--log tensorboard``, shown by the real TensorBoard.

    python tools/tensorboard_screenshot.py [--max-time 60s] [--eval-every 25] [--png docs/images/tensorboard.png]
    python tools/tensorboard_screenshot.py --runs DIR    # screenshot runs already trained under DIR

Trains on the bundled tinyshakespeare for ``--max-time`` into a temporary folder, starts ``tensorboard`` on a
free 127.0.0.1 port over it, and opens it in Debian's Chromium (Playwright) with every request that leaves
the server refused, so the picture also shows that TensorBoard works offline. Needs
``pip install 'charloom[tensorboard]' playwright`` and ``apt-get install chromium``.
tests/test_tensorboard.py starts the server and the page with the same functions.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TAG_FILTER = "input[placeholder='Filter tags (regex)']"  # the time-series view's tag filter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """The real ``tensorboard`` server over ``logdir`` on a free 127.0.0.1 port, once it lists a run; stop it
    with ``proc.kill()``."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/data/runs", timeout=2) as answer:
                if json.load(answer):
                    return proc, url
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"tensorboard did not serve {logdir} within {timeout:g} s")


def offline_page(browser: Any, url: str, blocked: list[str], width: int, height: int) -> Any:
    """A Playwright page that may reach ``url`` and nothing else: every other request is refused and added to
    ``blocked``."""
    page = browser.new_page(viewport={"width": width, "height": height})

    def route(request_route: Any) -> None:
        if request_route.request.url.startswith(url + "/"):
            request_route.continue_()
        else:
            blocked.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    return page


def screenshot(runs: Path, png: Path, tags: str) -> None:
    """The time-series view of every run under ``runs``, its tags filtered by the regex ``tags``, into ``png``."""
    from playwright.sync_api import sync_playwright

    proc, url = start_tensorboard(runs)
    blocked: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                page = offline_page(browser, url, blocked, 1400, 620)
                page.goto(url + "/#timeseries")
                page.fill(TAG_FILTER, tags)
                page.keyboard.press("Escape")  # the filter's suggestions
                page.wait_for_selector("card-view .tag")
                close = page.locator("[aria-label='Close side pane']")
                if close.count():
                    close.first.click()
                page.wait_for_timeout(2000)  # the charts draw after the data arrives
                png.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(png))
            finally:
                browser.close()
    finally:
        proc.kill()
        proc.wait()
    if blocked:
        raise RuntimeError(f"the page asked for {blocked[0]} (TensorBoard must work offline)")


def main(argv: list[str] | None = None) -> int:
    """Train (unless ``--runs``), then screenshot; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-time", default="60s", help="training time of the run shown (default: 60s)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between evaluations: points on the curves (default: 25)")
    parser.add_argument("--runs", type=Path, help="screenshot the runs under this folder instead of training one")
    parser.add_argument("--tags", default="loss|bpc", help="the tags shown, a regex (default: loss|bpc)")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "images" / "tensorboard.png", help="where to write it")
    args = parser.parse_args(argv)
    if args.runs is not None:
        screenshot(args.runs, args.png, args.tags)
    else:
        with tempfile.TemporaryDirectory(prefix="charloom-tb-") as tmp:
            runs = Path(tmp) / "runs"
            command = [sys.executable, "-m", "charloom", "train", "tinyshakespeare", "--out", str(runs / "tinyshakespeare"),
                       "--max-time", args.max_time, "--eval-every", str(args.eval_every), "--log", "tensorboard"]
            subprocess.run(command, check=True)
            screenshot(runs, args.png, args.tags)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
