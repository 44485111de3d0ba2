"""The search page in a real headless browser (Debian's chromium through selenium): type a
query, see ranked ads with their images loaded, titles, scores, visual words (matched ones
highlighted) and the model/catalogue versions; a screenshot is kept as a test artifact
(reports/search-page/search_page.png, or $ALIGNSEARCH_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import URI, LiveServer, new_ads_dir
from test_live import _image_ad

from components.catalogue import live

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("ALIGNSEARCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "reports"
                                / "search-page"))


def _driver(network_log: bool = False):
    """Headless chromium; `network_log`: Chrome's performance log holds every request it sends."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium + chromium-driver (make test installs them: infra/ensure_chromium.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,1400", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    # CSP violations are logged in "browser"; requests and their bodies in "performance".
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", **({"performance": "ALL"} if network_log else {})})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.parametrize("api_key", [None, "page-key"], ids=["no key", "API key"])
def test_search_page_shows_ranked_ads_with_images(store, synthetic_dataset_dir, tmp_path, api_key):
    """Under the page's own Content-Security-Policy (nothing blocked); with an API key the page
    asks for it, then sends it with every call, images included."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    root, cfg = store
    live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "new",
                                  [("new:heart", "heart zenko", _image_ad(synthetic_dataset_dir, "heart"))]),
                 validate_cfg=cfg.validation, cache_dir=cfg.data.cache_dir, experiment=cfg.registry.experiment,
                 progress=False)
    browser = _driver()
    try:
        with LiveServer(cfg, api_key=api_key) as server:
            browser.get(server.url + "/")
            wait = WebDriverWait(browser, 60)
            if api_key:
                wait.until(ec.visibility_of_element_located((By.ID, "key")))
                assert "API key" in browser.find_element(By.ID, "status").text
                browser.find_element(By.ID, "key").send_keys(api_key, Keys.ENTER)
            wait.until(ec.text_to_be_present_in_element((By.ID, "versions"), "catalogue v1"))
            box = browser.find_element(By.ID, "q")
            box.send_keys("heart", Keys.ENTER)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "li.hit")) == 10)
            # Every result image loaded (decoded, with a real size), none broken.
            wait.until(lambda b: b.execute_script(
                "return [...document.querySelectorAll('li.hit img')].every(i => i.complete && i.naturalWidth > 0)"))
            hits = browser.find_elements(By.CSS_SELECTOR, "li.hit")
            ids = [h.get_attribute("data-ad-id") for h in hits]
            assert "new:heart" in ids
            first = hits[0]
            assert first.find_element(By.CSS_SELECTOR, ".title").text
            assert "score" in first.find_element(By.CSS_SELECTOR, ".meta").text
            assert first.find_elements(By.CSS_SELECTOR, ".word")
            assert browser.find_elements(By.CSS_SELECTOR, ".word.matched"), "no matched visual word highlighted"
            assert "model v1" in browser.find_element(By.ID, "versions").text
            assert "10 ads in" in browser.find_element(By.ID, "status").text
            # Everything the page loaded came from the service itself (no CDN).
            origins = browser.execute_script(
                "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
            assert set(origins) <= {server.url}, origins
            blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
            assert blocked == []
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / f"search_page{'_key' if api_key else ''}.png"
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()
