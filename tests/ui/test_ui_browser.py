"""A real browser (Debian's chromium, driven by Playwright) uses the page as a person would."""

import io
import os

import pytest
from ui_helpers import SETTINGS, pixels, same_image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(30_000)
        page.goto(app_url)
        yield page
        browser.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's number box and commit it, as a person does."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def generate(page, previous_src: str | None = None) -> tuple[str, bytes]:
    """Click Generate; returns the new gallery image's URL and bytes."""
    page.click("#generate")
    page.wait_for_function("([prev]) => { const i = document.querySelector('#gallery img');"
                           " return i && i.src && i.src !== prev; }", arg=[previous_src])
    src = page.locator("#gallery img").first.get_attribute("src")
    return src, page.request.get(src).body()


def test_enable_two_adapters_set_weights_generate_and_change_a_weight(page, expected):
    from PIL import Image

    # The broken file is listed with its reason; the usable adapters each have an enable box.
    page.wait_for_selector("#on-style_a")
    assert "incomplete safetensors" in page.locator("#adapters-table").inner_text()
    page.locator("#on-style_a input[type=checkbox]").check()
    page.locator("#on-style_b input[type=checkbox]").check()
    set_number(page, "w-style_a", 0.8)
    set_number(page, "w-style_b", -0.5)
    page.wait_for_function("document.querySelector('#blend-summary textarea').value == 'style_a 0.8, style_b -0.5'")
    page.locator("#prompt textarea").fill("a red circle")
    for elem_id, value in (("steps", SETTINGS["steps"]), ("guidance", SETTINGS["guidance"]),
                           ("width", SETTINGS["width"]), ("height", SETTINGS["height"])):
        set_number(page, elem_id, value)

    src, first = generate(page)
    first = Image.open(io.BytesIO(first))
    assert first.text["parameters"].startswith("a red circle <lora:style_a:0.8> <lora:style_b:-0.5>")
    assert same_image(first, expected({"style_a": 0.8, "style_b": -0.5}))

    set_number(page, "w-style_a", 1.6)  # only a number changes; the next image uses it
    page.wait_for_function("document.querySelector('#blend-summary textarea').value.startsWith('style_a 1.6')")
    _, second = generate(page, src)
    second = Image.open(io.BytesIO(second))
    assert abs(pixels(first) - pixels(second)).max() > 10
    assert same_image(second, expected({"style_a": 1.6, "style_b": -0.5}))
    assert "<lora:style_a:1.6>" in page.locator("#parameters textarea").input_value()


def test_errors_are_messages_in_the_page_not_tracebacks(page):
    page.locator("#prompt textarea").fill("a red circle <lora:../../etc/passwd:1>")
    page.click("#generate")
    toast = page.locator(".toast-body").filter(has_text="not an adapter name").first
    toast.wait_for()
    assert "Traceback" not in page.content()
