"""The demo's atlas in a real browser: Debian's headless Chromium driven by Selenium and the system chromedriver.

Skipped, with the reason, where Chromium, chromedriver or selenium is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

try:
    from selenium.common.exceptions import TimeoutException
except ImportError:  # the module is skipped then (the browser fixture says why)
    TimeoutException = Exception

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
INDEX_S, HEAD_S = 1.0, 0.5  # issue 17: loadEventEnd of an index or model page, of a head page


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium or chromedriver is missing: apt-get install -y chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # console, DevTools network
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def open_page(driver, path):
    driver.get(path.resolve().as_uri())
    driver.get_log("browser")  # (drained before a page's own messages are read)
    return driver


def requested(driver) -> list[str]:
    """The URLs the browser asked for since the last call (DevTools Network.requestWillBeSent events)."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            out.append(msg["params"]["request"]["url"])
    return out


def load_seconds(driver) -> float:
    return driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000


def model_dir(atlas):
    return next(p for p in atlas.iterdir() if (p / "L00_H00.html").is_file())


def test_pages_load_fast_with_no_error_and_no_request_but_files(browser, atlas, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    m = model_dir(atlas)
    requested(browser)
    for page, limit in ((atlas / "index.html", INDEX_S), (m / "index.html", INDEX_S), (m / "L01_H02.html", HEAD_S)):
        browser.get(page.resolve().as_uri())
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight / 2)")
        time.sleep(0.3)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], f"{page}: {errors}"
        urls = requested(browser)
        assert len(urls) >= 3 and all(u.startswith("file:") for u in urls), urls  # the page, its CSS and JS at least
        assert load_seconds(browser) < limit, f"{page}: loadEventEnd {load_seconds(browser):.3f} s"
        shot = shots / f"{page.parent.name}_{page.stem}.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_head_table_sorts_on_click_and_filters_on_typing(browser, atlas):
    from selenium.webdriver.common.by import By

    d = open_page(browser, atlas / "index.html")
    button = d.find_element(By.CSS_SELECTOR, "#heads thead button[data-col='3']")  # the first statistic
    values = lambda: [  # noqa: E731
        float(v)
        for v in d.execute_script(
            "return Array.from(document.querySelectorAll('#heads tbody tr')).map(r => r.cells[3].dataset.v)"
        )
    ]
    before = values()
    button.click()
    assert values() == sorted(before, reverse=True)
    button.click()
    assert values() == sorted(before)
    box = d.find_element(By.ID, "filter")
    box.send_keys("L3")
    shown = d.execute_script(
        "return Array.from(document.querySelectorAll('#heads tbody tr')).filter(r => !r.hidden).map(r => r.textContent)"
    )
    assert len(shown) == 4 and all("L3" in t for t in shown)
    assert d.find_element(By.ID, "count").text == "4 of 16 heads"


def test_grid_cell_opens_its_head_and_keyboard_reaches_the_next(browser, atlas):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = open_page(browser, model_dir(atlas) / "index.html")
    d.find_element(By.CSS_SELECTOR, "#grid a[href='L02_H01.html']").click()
    assert d.current_url.endswith("/L02_H01.html")
    assert "layer 2, head 1" in d.find_element(By.TAG_NAME, "h1").text
    body = d.find_element(By.TAG_NAME, "body")
    for _ in range(40):  # Tab through the links until the "next head" one has the focus, then Enter
        body.send_keys(Keys.TAB) if _ == 0 else d.switch_to.active_element.send_keys(Keys.TAB)
        if d.switch_to.active_element.get_attribute("id") == "next-head":
            break
    d.switch_to.active_element.send_keys(Keys.ENTER)
    assert d.current_url.endswith("/L02_H02.html")
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)  # the arrow keys: the layer below
    WebDriverWait(d, 10).until(lambda d: d.current_url.endswith("/L03_H02.html"))


VISIBLE = (
    "return Array.from(document.images).filter(i => { const r = i.getBoundingClientRect();"
    " return r.bottom > 0 && r.top < innerHeight && r.width > 0; })"
    ".map(i => [i.getAttribute('src') || i.getAttribute('data-src'), i.complete && i.naturalWidth > 0])"
)


def test_every_visible_image_has_loaded(browser, atlas):
    from selenium.webdriver.support.ui import WebDriverWait

    d = open_page(browser, model_dir(atlas) / "L01_H02.html")
    checked = 0
    height = d.execute_script("return document.body.scrollHeight")
    for y in range(0, height, 900):
        d.execute_script(f"window.scrollTo(0, {y})")
        try:  # the lazy loader starts them as they come into view; a loaded machine may take a moment
            WebDriverWait(d, 10, poll_frequency=0.05).until(lambda d: all(ok for _, ok in d.execute_script(VISIBLE)))
        except TimeoutException:
            pass
        state = d.execute_script(VISIBLE)
        assert [src for src, ok in state if not ok] == []
        checked += len(state)
    assert checked > 50  # thumbnails and same-object examples were on screen
