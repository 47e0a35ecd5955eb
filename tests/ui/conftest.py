"""Fixtures of the UI tests: a real ``dagcraft ui`` process, and Debian's headless Chromium
driven by Playwright (never a downloaded browser; skipped, saying why, where none is found)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for cand in (os.environ.get("DAGCRAFT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium at /usr/bin/chromium or on PATH (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class UiProcess:
    """``dagcraft ui --port 0`` in its own process; ``url`` is what it printed when ready."""

    def __init__(self, store_url: str, env: dict[str, str] | None = None) -> None:
        full = dict(os.environ)
        full.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "dagcraft.cli.main", "ui", "--store", store_url,
                                      "--port", "0", "--workers", "1"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=full)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once the socket listens
        if not line.startswith("dagcraft ui: http://"):
            self.stop()
            raise AssertionError(f"dagcraft ui did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = line.split()[2].rstrip("/")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def ui_process() -> Iterator[Callable[..., UiProcess]]:
    started: list[UiProcess] = []

    def start(store_url: str, env: dict[str, str] | None = None) -> UiProcess:
        started.append(UiProcess(store_url, env))
        return started[-1]

    yield start
    for p in started:
        p.stop()
