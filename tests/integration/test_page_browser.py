"""The page in a real browser: Debian's chromium, headless, driven by Playwright, against a real
``delf-es serve`` (embedded index, fast Lite0 settings, six paris250 photos).  Loads the page,
enters the token, draws a crop box on a query photo, searches, waits for the hits, opens the
best one and checks that the verified correspondences are drawn as lines; saves screenshots
(to DELF_ES_SCREENSHOTS_DIR too when set: that is how docs/page-*.png are made).

chromium comes from scripts/install_browser.sh (scripts/test.sh runs it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from api_server import FAST_ENV, Server
from conftest import shared

pytestmark = pytest.mark.slow

TOKEN = "browser-token"
DATABASE = [
    "paris250/db/defense/paris_defense_000000.jpg",
    "paris250/db/defense/paris_defense_000002.jpg",
    "paris250/db/defense/paris_defense_000006.jpg",
    "paris250/db/defense/paris_defense_000013.jpg",
    "paris250/db/eiffel_tower/paris_eiffel_000000.jpg",
    "paris250/db/louvre/paris_louvre_000004.jpg",
]
QUERY_ID = "defense_4"  # a Paris6k query: its photo and its bbox come from gt.json


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run scripts/install_browser.sh", pytrace=False)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    server = Server({**FAST_ENV, "DELF_ES_DATA_DIR": str(folder / "data")}, folder / "serve.log", token=TOKEN)
    try:
        server.wait_ready()
        with server.client() as client:
            for path in DATABASE:
                name = Path(path).name
                response = client.put(f"/v1/images/{name}?refresh=true", files={"file": (name, shared(path).read_bytes())},
                                      data={"metadata": json.dumps({"landmark": Path(path).parent.name})})
                assert response.status_code == 201, response.text
        yield server
    finally:
        server.stop()


def query() -> tuple[Path, list[float]]:
    gt = json.loads(shared("paris250/gt.json").read_text())
    entry = next(q for q in gt["queries"] if q["id"] == QUERY_ID)
    return shared(f"paris250/{entry['image']}"), entry["bbox"]


def test_page_searches_a_region_and_draws_the_verified_correspondences(server, tmp_path):
    from playwright.sync_api import sync_playwright

    photo, bbox = query()
    out = [tmp_path] + ([Path(os.environ["DELF_ES_SCREENSHOTS_DIR"])] if os.environ.get("DELF_ES_SCREENSHOTS_DIR") else [])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(server.url + "/")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        page.wait_for_function("document.getElementById('stats').textContent.includes('6 images')", timeout=30_000)
        page.set_input_files("#query-file", str(photo))
        page.wait_for_function("document.getElementById('query-img').naturalWidth > 0")
        # draw the query's bbox as the crop box, in screen pixels of the shown photo
        natural = page.evaluate("[document.getElementById('query-img').naturalWidth, document.getElementById('query-img').naturalHeight]")
        box = page.locator("#query-img").bounding_box()
        scale = box["width"] / natural[0]
        page.mouse.move(box["x"] + bbox[0] * scale + 1, box["y"] + bbox[1] * scale + 1)
        page.mouse.down()
        page.mouse.move(box["x"] + bbox[2] * scale - 1, box["y"] + bbox[3] * scale - 1, steps=8)
        page.mouse.up()
        assert page.is_visible("#crop") and "region" in page.inner_text("#crop-label")
        page.click("#search")
        page.wait_for_selector(".hit", timeout=120_000)
        page.wait_for_function("Array.from(document.querySelectorAll('.hit img')).every(i => i.complete && i.naturalWidth > 0)",
                               timeout=30_000)
        hits = page.locator(".hit")
        assert hits.count() >= 2
        first = hits.nth(0).get_attribute("data-id")
        assert first.startswith("paris_defense_")
        for directory in out:
            directory.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(directory / "page-hits.png"))
        hits.nth(0).click()
        page.wait_for_selector("#match-lines line", timeout=30_000)
        assert not page.is_visible("#hits") and page.is_visible("#match-query") and page.is_visible("#match-hit")
        lines = page.locator("#match-lines line").count()
        title = page.inner_text("#match-title")
        inliers = int(title.split("·")[1].split()[0])
        assert lines == inliers and lines >= 12
        # every line ends inside the two shown images
        ends = page.evaluate("""() => {
            const stage = document.getElementById('match-stage').getBoundingClientRect();
            const q = document.getElementById('match-query').getBoundingClientRect();
            const h = document.getElementById('match-hit').getBoundingClientRect();
            return Array.from(document.querySelectorAll('#match-lines line')).map(l => {
              const [x1, y1, x2, y2] = ['x1', 'y1', 'x2', 'y2'].map(a => +l.getAttribute(a));
              return x1 >= q.left - stage.left - 1 && x1 <= q.right - stage.left + 1 && y1 >= q.top - stage.top - 1 &&
                     y1 <= q.bottom - stage.top + 1 && x2 >= h.left - stage.left - 1 && x2 <= h.right - stage.left + 1 &&
                     y2 >= h.top - stage.top - 1 && y2 <= h.bottom - stage.top + 1; }); }""")
        assert all(ends)
        for directory in out:
            page.screenshot(path=str(directory / "page-match.png"))
        browser.close()
    assert not errors, errors
    assert all(url.startswith(server.url) or url.startswith("blob:") for url in requests), requests
    assert (tmp_path / "page-hits.png").stat().st_size > 10_000


def test_page_adds_images_with_per_file_results(server, tmp_path):
    from playwright.sync_api import sync_playwright

    good = tmp_path / "moulinrouge.jpg"
    good.write_bytes(shared("paris250/db/moulinrouge/paris_moulinrouge_000003.jpg").read_bytes())
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        page.click("#tab-add")
        page.set_input_files("#add-files", [str(good), str(bad)])
        page.wait_for_function("document.getElementById('add-count').textContent.includes('done')", timeout=120_000)
        rows = page.locator("#add-results tr")
        assert rows.count() == 2
        assert rows.nth(0).locator("td").nth(1).inner_text() == "created"
        assert rows.nth(1).locator("td").nth(1).inner_text() == "failed"
        assert "InvalidImage" in rows.nth(1).locator("td").nth(3).inner_text()
        assert page.evaluate("document.getElementById('add-progress').value") == 2
        browser.close()
    with server.client() as client:
        assert client.get("/v1/images/moulinrouge.jpg").status_code == 200
        assert client.delete("/v1/images/moulinrouge.jpg").status_code == 200
    assert httpx.get(server.url + "/healthz").json()["images"] == 6
