"""Serve an app on a free 127.0.0.1 port in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serving(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """``app`` on a real uvicorn server on a free 127.0.0.1 port; yields its base URL and stops
    the server on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the server did not start on 127.0.0.1:{port} in {timeout:g} s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def chromium(width: int = 1280, height: int = 1024) -> Any:
    """A headless Debian Chromium under Selenium (chromium + chromium-driver; scripts/setup.sh
    installs them)."""
    import shutil

    from selenium import webdriver

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        raise RuntimeError("install Debian chromium and chromium-driver (scripts/setup.sh)")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.binary_location = binary
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    drv.implicitly_wait(0)
    return drv
