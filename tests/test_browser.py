"""The demo page in a real headless Chromium (Debian's, driven by Playwright): upload, write, continue, new version."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from live_server import tiny_live_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    with tiny_live_server(tmp_path_factory.mktemp("demo"), "demo") as running:
        yield running.url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (run `make browser-deps` as root)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_url):
    """A freshly loaded demo page for each test; requests leaving loopback are blocked, and none may be made."""
    external: list[str] = []

    def loopback_only(route) -> None:
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    context.route("**/*", loopback_only)
    page = context.new_page()
    page.goto(demo_url + "/")
    page.wait_for_selector("#generate", timeout=TIMEOUT_MS)
    yield page
    context.close()
    assert external == [], f"the page asked for resources outside the server: {external}"


def story_box(page):
    return page.locator("#story textarea")


def test_bad_input_shows_an_error(page):
    from playwright.sync_api import expect

    page.click("#generate")  # no picture yet
    expect(page.locator(".toast-body").filter(has_text="no image given")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#status")).to_contain_text("Cannot write this story", timeout=TIMEOUT_MS)


def test_upload_write_continue_and_new_version(page, tmp_path):
    from playwright.sync_api import expect

    from mmstory.examples import example_image

    photo = tmp_path / "coffee.jpg"
    example_image("coffee").save(photo)
    page.locator("#pictures input[type=file]").set_input_files(str(photo))
    expect(page.locator("#pictures img").first).to_be_visible(timeout=TIMEOUT_MS)

    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done", timeout=TIMEOUT_MS)
    story = story_box(page).input_value()
    assert story.strip()
    expect(page.locator("#captions tbody tr")).to_have_count(1)
    expect(page.locator("#grounding")).not_to_be_empty()
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")

    page.click("#continue")
    expect(story_box(page)).not_to_have_value(story, timeout=TIMEOUT_MS)
    expect(page.locator("#status")).to_contain_text("Done", timeout=TIMEOUT_MS)
    continued = story_box(page).input_value()
    assert continued.startswith(story + "\n\n") and len(continued) > len(story) + 2

    page.click("#new-version")
    expect(page.locator("#status")).not_to_contain_text("seed 0 ", timeout=TIMEOUT_MS)
    expect(page.locator("#status")).to_contain_text("Done", timeout=TIMEOUT_MS)
    assert int(re.search(r"seed (\d+)", page.locator("#status").inner_text()).group(1)) != 0
    assert story_box(page).input_value() not in ("", continued)


def test_example_fills_the_gallery(page):
    from playwright.sync_api import expect

    expect(page.locator("#pictures img")).to_have_count(0)
    page.locator("#examples img").first.click()
    expect(page.locator("#pictures img").first).to_be_visible(timeout=TIMEOUT_MS)
