"""The user's view, in a real browser: JupyterLab on loopback, headless Chromium via Playwright.

A notebook starts the pool with a real click on the control panel's Start button, then runs a
training cell; the dashboard must render (no "Error displaying widget") and update while the
cell runs (its plotted point count grows), and leave its PNG when the cell ends. Screenshots go
to `artifacts/` for CI to keep.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = os.environ.get("NBDIST_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

PANEL_CELL = "import nbdist\n%load_ext nbdist\npanel = nbdist.PoolWidget()\npanel"
TRAIN_CELL = (
    "%%distributed\n"
    "import time\n"
    "for i in range(300):\n"
    "    nbdist.report(step=i, loss=1.0 / (i + 1), samples=8, total=300)\n"
    "    time.sleep(0.03)\n"
    "print('trained on', world_size, 'ranks')"
)


def _notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
              "source": source} for source in (PANEL_CELL, TRAIN_CELL)]
    path.write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    }))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """A JupyterLab server on loopback only, with a token; yields the notebook's URL."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `apt-get install -y chromium` "
                    "(the README's test command does), or set NBDIST_TEST_CHROMIUM.")
    _notebook(tmp_path / "dashboard.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    log = open(tmp_path / "lab.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()) from None
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/lab/tree/dashboard.ipynb?token={token}"
    finally:
        server.terminate()  # shuts its kernels down; their engines go with them (nbdist.guard)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "lab.log", ARTIFACTS / "browser-jupyterlab.log")


def _run_cell(page: Any, index: int) -> None:
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _points(page: Any) -> int:
    marker = page.locator(".nbdist-points")
    if marker.count() == 0:
        return -1
    return int(marker.first.get_attribute("data-points") or -1)


def test_dashboard_in_jupyterlab_started_from_the_control_panel(lab: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        try:
            page.goto(lab)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=60_000)

            _run_cell(page, 0)
            start = page.locator("button.widget-button[title='Start']")
            start.wait_for(timeout=60_000)
            start.click()  # the real click: the kernel starts the pool from the button's handler
            expect(page.locator(".widget-html", has_text="engines ready")).to_be_visible(timeout=120_000)
            expect(page.locator("table.nbdist-engines tr")).to_have_count(3, timeout=30_000)  # header + 2
            page.screenshot(path=str(ARTIFACTS / "browser-panel.png"), full_page=True)

            _run_cell(page, 1)
            page.locator(".nbdist-points").first.wait_for(state="attached", timeout=60_000)
            first = _points(page)
            time.sleep(3)
            second = _points(page)
            page.screenshot(path=str(ARTIFACTS / "browser-dashboard-live.png"), full_page=True)
            assert second > first > 0, f"the dashboard did not update while the cell ran: {first} -> {second}"
            assert page.get_by_text("Error displaying widget").count() == 0

            outputs = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea")
            expect(outputs).to_contain_text("trained on 2 ranks", timeout=120_000)
            # When the cell ends, the live widget gives way to the static PNG of its final plots.
            expect(outputs.locator("img[src^='data:image/png']")).to_have_count(1, timeout=30_000)
            assert page.get_by_text("Error displaying widget").count() == 0
            page.screenshot(path=str(ARTIFACTS / "browser-dashboard-final.png"), full_page=True)
        finally:
            page.screenshot(path=str(ARTIFACTS / "browser-last.png"), full_page=True)
            browser.close()
