"""The page in a real browser: Debian's headless Chromium, driven by Selenium through the system chromedriver (never
Selenium Manager, which would download one), against the app served by uvicorn on loopback."""

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from components.app.http import create_app, load_searcher
from tests.conftest import free_port
from tests.test_http import MODEL_INFO, TOKEN, build_catalog

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
K = 5


@pytest.fixture(scope="module")
def browser() -> Iterator:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        message = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {message}")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_download(*_, **__):
        raise AssertionError("Selenium Manager ran: it would fetch a driver over the network")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-default-apps", "--window-size=1280,900"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SeleniumManager, "binary_paths", no_download)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[str, object]]:
    """The app (token set) served by uvicorn in a thread on a free loopback port; yields (URL, catalog)."""
    catalog = build_catalog(tmp_path_factory.mktemp("catalog"))
    searcher, _ = load_searcher(catalog.location, catalog.checkpoint)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(searcher, model_info=MODEL_INFO, token=TOKEN),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", catalog
    server.should_exit = True
    thread.join(10)


def test_page_searches_an_uploaded_image(browser, site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, catalog = site
    browser.get(url)
    assert browser.title.startswith("Firesight")
    wait = WebDriverWait(browser, 60)
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys(str(K))
    file_input = browser.find_element(By.ID, "file")

    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image\n")
    file_input.send_keys(str(not_an_image))  # without the token first
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "token" in browser.find_element(By.ID, "error").text

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    file_input.send_keys(str(not_an_image))
    wait.until(lambda d: "not an image" in d.find_element(By.ID, "error").text)

    query = catalog.images.iloc[9]
    file_input.send_keys(str(Path(query.uri).resolve()))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == K)
    wait.until(lambda d: all(img.get_attribute("src").startswith("blob:")
                             for img in d.find_elements(By.CSS_SELECTOR, "#results .hit img.thumb")))
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.ID, "query-image").get_attribute("src").startswith("blob:")
    hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    assert [h.find_element(By.CLASS_NAME, "rank").text for h in hits] == [f"#{i}" for i in range(1, K + 1)]
    labels = [h.find_element(By.CLASS_NAME, "label").text for h in hits]
    assert set(labels) <= set(catalog.images.label) and labels[0] == query.label
    scores = [float(h.find_element(By.CLASS_NAME, "score").text.removeprefix("score ")) for h in hits]
    assert scores[0] == pytest.approx(1.0, abs=1e-3) and scores == sorted(scores, reverse=True)
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0
               for img in browser.find_elements(By.CSS_SELECTOR, "#results img.thumb"))
    assert f"{K} results" in browser.find_element(By.ID, "status").text
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/search" not in e["message"]]
