"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver) against `simsearch serve`.

Set SIMSEARCH_DASHBOARD_SCREENSHOT=docs/dashboard.png to write the README's screenshot; the test always
saves one under its tmp_path.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from browser import headless_chromium, needs_chromium
from realdata import needs_piped, piped_test

pytestmark = [needs_piped, needs_chromium]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(writable_index, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ, SIMSEARCH_TOKEN="browser-test-token")
    proc = subprocess.Popen([sys.executable, "-m", "simsearch.cli", "serve", "--index", f"piped={writable_index}",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("server did not start:\n" + (tmp_path / "server.log").read_text())
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    driver = headless_chromium(1280, 1120)
    yield driver
    driver.quit()


def test_dashboard_shows_verdict_heatmap_and_reference_patches(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server + "/")
    wait.until(lambda d: "reference images" in d.find_element(By.ID, "overview-list").text)
    overview = browser.find_element(By.ID, "overview-list").text
    assert "23" in overview and "per 100 good parts" in overview

    # Two images in one pick (one request), then the defect on its own: the gallery keeps all three.
    first = [piped_test("good")[0], piped_test("impurity")[3]]
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in first))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 2)
    defect = piped_test("impurity")[0]
    browser.find_element(By.ID, "file-input").send_keys(str(defect))
    # The first pick holds a defect too: wait for the defect's own record, not the earlier one's verdict.
    wait.until(ec.text_to_be_present_in_element((By.ID, "image-name"), defect.name))
    wait.until(ec.text_to_be_present_in_element((By.ID, "verdict"), "ANOMALOUS"))
    assert "against threshold" in browser.find_element(By.ID, "score-text").text
    heatmap_loaded = "const i = document.getElementById('heatmap'); return i.complete && i.naturalWidth"
    wait.until(lambda d: d.execute_script(heatmap_loaded))
    assert browser.execute_script(heatmap_loaded) == 128
    assert browser.execute_script("return document.getElementById('heatmap').src").startswith("blob:")
    # Queried afresh on each poll: the dashboard may redraw the region list (a stale handle would fail).
    references_loaded = ("const r = document.querySelectorAll('#regions li.region img.reference');"
                         " return r.length > 0 && Array.from(r).every(i => i.complete && i.naturalWidth > 0)")
    wait.until(lambda d: d.execute_script(references_loaded))
    assert browser.find_elements(By.CSS_SELECTOR, "#regions li.region canvas")  # the query's side of the pair
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 3)
    assert defect.name in browser.find_element(By.CSS_SELECTOR, "#gallery figure").text  # newest first
    assert not browser.find_element(By.ID, "error").is_displayed()

    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    wanted = os.environ.get("SIMSEARCH_DASHBOARD_SCREENSHOT")
    if wanted:
        shutil.copyfile(tmp_path / "dashboard.png", wanted)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
