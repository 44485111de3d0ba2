"""What the search page shows of a hit: the first `align.words_shown` visual words (matched
ones highlighted), and for each the part of the image it came from, computed when the
catalogue version is encoded (the part the alignment head scores highest for the word),
placed on the displayed image however it is letterboxed; opening an ad sends POST /click with
the search's request id, and the page searches as `"source": "page"`, under its unchanged
Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import URI, LiveServer, new_ads_dir
from PIL import Image
from test_live import _image_ad
from test_page import ARTIFACTS, _driver

from components.catalogue import live
from components.data.format import Dataset
from components.registry.models import open_model
from components.search.engine import SearchEngine, ad_features
from components.search.page import CONTENT_SECURITY_POLICY

pytestmark = pytest.mark.slow

QUERIES = ("heart", "star", "leaf")


def _wide_copy(folder, ad_id: str) -> None:
    """Make `ad_id`'s image in a new-ads folder twice as wide as high (the picture on the left
    half, white on the right), so its display is letterboxed."""
    ads = pd.read_parquet(folder / "ads.parquet").set_index("ad_id")
    path = folder / ads.loc[ad_id, "image_path"]
    with Image.open(path) as image:
        picture = image.convert("RGB")
    wide = Image.new("RGB", (picture.width * 2, picture.height), (255, 255, 255))
    wide.paste(picture, (0, 0))
    wide.save(path, format="PNG")


def _add(cfg, dataset_dir, tmp_path):
    picks = [(f"new:{q}", "zenko offer", _image_ad(dataset_dir, q)) for q in QUERIES]
    folder = new_ads_dir(dataset_dir, tmp_path / "new", picks)
    _wide_copy(folder, "new:heart")  # the page test finds it by the new ads' title
    live.add_ads(URI, folder, validate_cfg=cfg.validation, cache_dir=cfg.data.cache_dir,
                 experiment=cfg.registry.experiment, progress=False)
    return folder


def test_shown_words_come_with_the_part_the_alignment_scores_highest(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    cache = cfg.data.cache_dir
    folder = _add(cfg, synthetic_dataset_dir, tmp_path)
    ref = open_model(URI, cache)
    engine = SearchEngine(ref.bundle_dir, catalogue=live.current_catalogue(ref, cache))
    shown = engine.alignment.words_shown
    assert shown == 3 and engine.catalogue.words_shown == shown
    by_id = {h.ad_id: h for h in engine.search(["heart"], len(engine))[0]}

    # The check, computed apart: each part's logit of the word under the head, best valid part.
    new_ads = pd.read_parquet(folder / "ads.parquet")
    dataset = Dataset(ads=new_ads.assign(split="test"), queries=pd.DataFrame(columns=["query_id", "text", "split"]),
                      qrels=pd.DataFrame(columns=["query_id", "ad_id", "relevance", "split"]), root=folder)
    features = ad_features(dataset, engine.vision, cache)
    z, mask = engine.alignment.instances(features)
    with torch.inference_mode():
        logits = engine.alignment.head.instance_logits(torch.as_tensor(z[:, 1:])).numpy()  # (N, P, V)
    vocabulary = {w: j for j, w in enumerate(engine.alignment.words)}
    for i, ad_id in enumerate(new_ads["ad_id"]):
        hit = by_id[ad_id]
        assert hit.words_shown == hit.visual_words[:shown] and 0 < len(hit.words_shown) <= shown
        assert set(hit.word_regions) == set(hit.words_shown), "every shown word of a new ad has its region"
        width, height = features.image_sizes[i]
        for word, box in hit.word_regions.items():
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, (ad_id, word, box)
            scores = np.where(mask[i, 1:], logits[i, :, vocabulary[word]], -np.inf)
            best = int(np.argmax(scores))
            expected = features.boxes[i, best] / [width, height, width, height]
            assert np.allclose(box, expected, atol=1e-4), (ad_id, word, box, expected)
    # The wide image: its parts were cut from the letterboxed square, their boxes are on the
    # picture (the left half), never on the padding above or below it.
    assert all(box[0] < 0.5 for box in by_id["new:heart"].word_regions.values())
    # Ads of the registered version: their bundle stores regions too (test_bundle_regions.py).
    old = next(h for h in by_id.values() if not h.ad_id.startswith("new:"))
    assert set(old.word_regions) == set(old.words_shown) and len(old.words_shown) <= shown


def test_the_api_answers_shown_words_and_regions(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    _add(cfg, synthetic_dataset_dir, tmp_path)
    with LiveServer(cfg) as server:
        body = httpx.post(server.url + "/search", json={"query": "star", "k": 100}, timeout=30).json()
    hit = next(h for h in body["results"] if h["ad_id"] == "new:star")
    assert hit["words_shown"] == hit["visual_words"][:3]
    assert set(hit["word_regions"]) == set(hit["words_shown"])
    assert all(len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
               for box in hit["word_regions"].values())
    assert set(hit["matched_words"]) <= set(hit["visual_words"])  # unchanged fields, as clients read them


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_served_page_sends_clicks_and_keeps_its_policy(store):
    root, cfg = store
    with LiveServer(cfg) as server:
        response = httpx.get(server.url + "/", timeout=30)
    html = response.text
    script = re.search(r"<script>(.*)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*)</style>", html, re.S).group(1)
    # The policy as before: the page's own inline script and style by hash, nothing else.
    policy = (f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; "
              "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    assert response.headers["content-security-policy"] == policy == CONTENT_SECURITY_POLICY
    # The code path of a click: POST /click with the search's request id and the ad, kept alive.
    send = re.search(r"function sendClick\(requestId, adId\) \{(.*?)\n\}", script, re.S).group(1)
    assert 'api("/click", {method: "POST", keepalive: true' in send
    assert "JSON.stringify({request_id: requestId, ad_id: adId})" in send
    assert 'a.addEventListener("click", () => sendClick(requestId, hit.ad_id))' in script
    assert "const requestId = body.request_id" in script
    assert 'JSON.stringify({query: q, k: 10, source: "page"})' in script


class NetworkLog:
    """What the browser sent and got, from Chrome's performance log (read once: reading drains it)."""

    def __init__(self) -> None:
        self.sent: dict[str, dict] = {}  # Chrome's request id -> url path, method, body, response headers

    def read(self, browser) -> NetworkLog:
        for entry in browser.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message["method"] == "Network.requestWillBeSent":
                request = params["request"]
                self.sent[params["requestId"]] = {"path": httpx.URL(request["url"]).path, "method": request["method"],
                                                  "body": request.get("postData"), "headers": {}}
            elif message["method"] == "Network.responseReceived" and params["requestId"] in self.sent:
                headers = params["response"].get("headers", {})
                self.sent[params["requestId"]]["headers"] = {k.lower(): v for k, v in headers.items()}
        return self

    def to(self, path: str) -> list[dict]:
        return [r for r in self.sent.values() if r["path"] == path]


def test_hovering_a_word_outlines_its_region_and_opening_an_ad_sends_the_click(store, synthetic_dataset_dir,
                                                                              tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    root, cfg = store
    _add(cfg, synthetic_dataset_dir, tmp_path)
    browser = _driver(network_log=True)
    network = NetworkLog()
    try:
        with LiveServer(cfg) as server:
            answer = httpx.post(server.url + "/search", json={"query": "zenko offer", "k": 10}, timeout=30).json()
            regions_of = next(h for h in answer["results"] if h["ad_id"] == "new:heart")["word_regions"]
            browser.get(server.url + "/")
            wait = WebDriverWait(browser, 60)
            browser.find_element(By.ID, "q").send_keys("zenko offer", Keys.ENTER)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, 'li.hit[data-ad-id="new:heart"]'))
            wait.until(lambda b: b.execute_script(
                "return [...document.querySelectorAll('li.hit img')].every(i => i.complete && i.naturalWidth > 0)"))
            wait.until(lambda b: any(r["headers"] for r in network.read(b).to("/search")))
            searches = network.to("/search")
            assert [s["method"] for s in searches] == ["POST"]
            assert json.loads(searches[0]["body"]) == {"query": "zenko offer", "k": 10, "source": "page"}
            search_id = searches[0]["headers"]["x-request-id"]

            hit = browser.find_element(By.CSS_SELECTOR, 'li.hit[data-ad-id="new:heart"]')
            assert 0 < len(hit.find_elements(By.CSS_SELECTOR, ".word")) <= 3
            chips = hit.find_elements(By.CSS_SELECTOR, ".word.has-region")
            assert chips and {c.text for c in chips} == set(regions_of)
            image = hit.find_element(By.CSS_SELECTOR, ".thumb img")
            # The wide image is letterboxed in its square: the picture is shown 96 x 48, 24 px down.
            natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
            rect = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                          "return [r.left, r.top, r.width, r.height]", image)
            scale = min(rect[2] / natural[0], rect[3] / natural[1])
            shown_w, shown_h = natural[0] * scale, natural[1] * scale
            left, top = rect[0] + (rect[2] - shown_w) / 2, rect[1] + (rect[3] - shown_h) / 2
            assert shown_h < rect[3] - 10, "the test image should be letterboxed"
            outline = hit.find_element(By.CSS_SELECTOR, ".region")
            assert not outline.is_displayed()
            for chip in chips:
                ActionChains(browser).move_to_element(chip).perform()
                wait.until(lambda b: outline.is_displayed())
                box = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                             "return [r.left, r.top, r.right, r.bottom]", outline)
                x0, y0, x1, y1 = regions_of[chip.text]
                expected = [left + x0 * shown_w, top + y0 * shown_h, left + x1 * shown_w, top + y1 * shown_h]
                assert np.allclose(box, expected, atol=1.0), (chip.text, box, expected)
                assert top - 0.5 <= box[1] and box[3] <= top + shown_h + 0.5, "on the picture, not the padding"
                ActionChains(browser).move_to_element(browser.find_element(By.ID, "status")).perform()
                wait.until(lambda b: not outline.is_displayed())
            # Keyboard focus outlines a word's region too.
            browser.execute_script("arguments[0].focus()", chips[0])
            wait.until(lambda b: outline.is_displayed())
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "search_page_region.png"
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

            # Opening the ad (its title) sends the click, with the request id of the search that showed it.
            hit.find_element(By.CSS_SELECTOR, "a.open .title").click()
            wait.until(lambda b: network.read(b).to("/click"))
            clicks = network.to("/click")
            assert len(clicks) == 1 and clicks[0]["method"] == "POST"
            assert json.loads(clicks[0]["body"]) == {"request_id": search_id, "ad_id": "new:heart"}
    finally:
        browser.quit()
