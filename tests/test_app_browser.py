"""End to end in a real headless browser: Debian's Chromium driven by Playwright.

Chromium is the system one (``/usr/bin/chromium``, from ``apt-get install chromium``), never a
Playwright download; ``MOCORETRIEVAL_CHROMIUM`` points elsewhere.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from app_helpers import build_photo_index, launch_app, shown_paths

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # root in CI containers has no user namespace for the sandbox
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TIMEOUT_MS = 30_000


def chromium_path() -> str:
    path = (
        os.environ.get("MOCORETRIEVAL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    )
    if not Path(path).is_file():
        pytest.fail(
            "the browser tests need Debian's Chromium: `apt-get install -y chromium "
            "chromium-driver` (or set MOCORETRIEVAL_CHROMIUM to a Chromium binary)"
        )
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    index = build_photo_index(tmp_path_factory.mktemp("browser"))
    url, page = launch_app(index, max_upload_mb=1)
    yield url, index
    page.close()
    index.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, permissions=["clipboard-read", "clipboard-write"]
    )
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requested = []  # every URL the page asks for
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(served[0])
    page.locator("#query input[type=file]").wait_for(state="attached")
    yield page
    context.close()


def captions(page) -> list[str]:
    return page.locator("#results .caption-label").all_inner_texts()


def test_upload_shows_neighbours_and_click_searches_again(page, served, tmp_path):
    from playwright.sync_api import expect

    _, index = served
    query = tmp_path / "my photo.png"
    shutil.copy(index.root / "img_0003.png", query)
    page.locator("#query input[type=file]").set_input_files(str(query))
    first = page.locator("#results .caption-label").first
    expect(first).to_contain_text("· img_0003.png")  # the expected neighbour: the same image
    expected = shown_paths(index, index.search(query, k=5))
    assert [c.split(" · ", 1)[1] for c in captions(page)] == expected
    expect(page.locator("#results img").first).to_be_visible()
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
    assert (tmp_path / "search.png").stat().st_size > 10_000

    # Clicking a result searches from it: it becomes the first result.
    second = captions(page)[1].split(" · ", 1)[1]
    page.locator("#results button.thumbnail-item").nth(1).click()
    expect(first).to_contain_text(f"· {second}")
    expect(page.locator("#query img")).to_be_visible()
    # Private photos: the page fetches nothing from other sites (fonts, scripts, telemetry).
    url = served[0]
    assert page.requested and all(u.startswith((url, "data:", "blob:")) for u in page.requested)


def test_paste_from_the_clipboard_searches(page, served):
    from playwright.sync_api import expect

    _, index = served
    png = base64.b64encode((index.root / "img_0005.png").read_bytes()).decode()
    page.evaluate(
        """async (b64) => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const item = new ClipboardItem({"image/png": new Blob([bytes], {type: "image/png"})});
          await navigator.clipboard.write([item]);
        }""",
        png,
    )
    page.get_by_role("button", name="Paste from clipboard").click()
    expect(page.locator("#results .caption-label").first).to_contain_text("· img_0005.png")


def test_bad_uploads_show_a_message(page, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    page.locator("#query input[type=file]").set_input_files(str(bad))
    expect(page.locator("#message")).to_contain_text("Cannot search")
    assert captions(page) == []

    big = tmp_path / "huge.jpg"  # over the app's 1 MB limit: refused before it is stored
    big.write_bytes(b"\xff" * 1_500_000)
    page.locator("#query input[type=file]").set_input_files(str(big))
    expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible()
    assert "Traceback" not in page.content()


def test_examples_duplicates_and_summary(page, served):
    from playwright.sync_api import expect

    _, index = served
    example = page.locator("#examples .caption-label").first
    expect(example).to_be_visible()
    page.locator("#examples button.thumbnail-item").first.click()  # search from an example
    expect(page.locator("#results .caption-label").first).to_contain_text(
        f"· {example.inner_text()}"
    )

    page.get_by_role("tab", name="Near-duplicates").click()
    page.locator("#threshold input[type=number]").fill("0.999")
    page.locator("#threshold input[type=number]").press("Enter")
    page.get_by_role("button", name="Find near-duplicates").click()
    expect(page.locator("#dup-message")).to_contain_text("1 group(s), 2 images")
    expect(page.locator("#group")).to_contain_text("sub/copy_of_4.jpg")
    expect(page.locator("#group")).to_contain_text("img_0004.jpg")

    page.get_by_role("tab", name="Index").click()
    expect(page.locator("#summary")).to_contain_text(f"Images: {len(index)}")
