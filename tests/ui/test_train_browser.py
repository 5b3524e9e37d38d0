"""The Train tab in a real browser (Debian's chromium, driven by Playwright), used as a person would: caption a
folder with a tiny tagger, edit a caption, set up a run, watch it, stop it, reload the page, resume it, and
blend the adapter it made."""

import io
import os
import time

import pytest
from ui_helpers import FAST_RUN, click_generate, pixels

from imglora.synthetic.shapes import synth_shapes
from ui.tabs.train import CURVE_COLOURS

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium)")]


@pytest.fixture(scope="module")
def page(train_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)  # a run's steps, on a shared 2-core machine
        page.goto(train_app["url"])
        yield page
        browser.close()


def value(page, selector: str) -> str:
    return page.locator(selector).first.input_value()


def wait_text(page, selector: str, text: str) -> None:
    """Until the textbox (or textarea) at `selector` contains `text`."""
    page.wait_for_function("([s, t]) => { const e = document.querySelector(s); return e && e.value.includes(t); }",
                           arg=[selector, text])


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def open_train(page, section: str | None = None) -> None:
    page.get_by_role("tab", name="Train").click()
    if section:
        page.get_by_role("tab", name=section).click()


def drawn(page, series: str) -> int:
    """Pixels of the plot in the colour of `series`: its line is drawn (not just the axes)."""
    import numpy as np
    from PIL import Image

    colour = [int(CURVE_COLOURS[series][i:i + 2], 16) for i in (1, 3, 5)]
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#train-plot").screenshot())).convert("RGB")).astype(int)
    return int((abs(shot - colour).max(axis=2) < 40).sum())


def wait_drawn(page, series: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while drawn(page, series) < 30:
        assert time.monotonic() < deadline, f"the plot shows no {series} line"
        page.wait_for_timeout(500)


def test_caption_run_watch_stop_reload_resume_and_blend_the_new_adapter(page, train_app):
    from PIL import Image

    folder = train_app["datasets"] / "tagme"
    synth_shapes(folder, 8, seed=3, size=64, colours=("red", "blue"), backgrounds=("white",))
    for caption in folder.glob("*.txt"):
        caption.unlink()

    # The dataset: its images without captions, then captioned by the tagger in the captioners folder.
    open_train(page, "Dataset")
    page.click("#train-relist")
    choose(page, "train-dataset", "tagme")
    page.wait_for_function("document.querySelectorAll('#train-thumbs img').length == 8")
    assert "missing caption" in value(page, "#train-findings textarea")
    page.click("#train-autocaption")
    wait_text(page, "#train-note textarea", "8 image(s) captioned")
    page.wait_for_function("document.querySelector('#train-findings textarea').value.includes('no problems found')")
    first = (folder / "00000.txt").read_text().strip()
    assert "simple background" in first and ("red theme" in first or "blue theme" in first)
    assert len(list(folder.glob("*.txt"))) == 8

    # One caption edited by hand: click its thumbnail, write, save.
    page.locator("#train-thumbs .thumbnail-item").first.click()
    wait_text(page, "#train-image textarea", "00000.png")
    assert value(page, "#train-caption textarea") == first
    page.locator("#train-caption textarea").fill("a red zorbly on a white background")
    page.click("#train-save-caption")
    wait_text(page, "#train-note textarea", "saved 00000.txt")
    assert (folder / "00000.txt").read_text() == "a red zorbly on a white background\n"

    # Settings: a TOML into the form, one field changed in the form itself, a run name; Start.
    open_train(page, "Settings")
    page.locator("#train-toml-box").get_by_text("As TOML").click()
    page.locator("#train-toml textarea").fill(FAST_RUN)
    page.click("#train-toml-to-form")
    page.wait_for_function("document.querySelector('#cfg-steps input').value == '200'")
    assert value(page, "#cfg-rank input") == "4" and value(page, "#cfg-lr input") == "0.01"
    page.locator("#cfg-steps input").fill("300")  # long enough to stop it on the way
    page.locator("#cfg-steps input").press("Enter")
    page.locator("#train-run-name textarea").fill("browser_run")
    page.click("#train-start")

    # Runs: progress, the loss curve and the first sample grid; then Stop saves a checkpoint.
    page.get_by_role("tab", name="Runs").wait_for()
    wait_text(page, "#train-status textarea", "browser_run: running")
    wait_text(page, "#train-status textarea", " left")  # steps/s and the time left, from the run's own log
    page.wait_for_selector("#train-samples img")
    first_grid = page.locator("#train-samples img").first.get_attribute("src")
    wait_drawn(page, "loss (average)")
    page.click("#train-stop")
    wait_text(page, "#train-status textarea", "stopped: checkpoint step-")
    stopped = value(page, "#train-status textarea")
    assert "step 300/300" not in stopped, "the run ended before Stop: make it longer"

    # Resume; a reloaded page shows the same run (it lives in the server) until it finishes.
    page.click("#train-resume")
    wait_text(page, "#train-status textarea", "browser_run: running")
    page.reload()
    open_train(page, "Runs")
    wait_text(page, "#train-status textarea", "browser_run: ")
    wait_text(page, "#train-status textarea", "finished: in the adapters list as browser_run")
    assert "step 300/300" in value(page, "#train-status textarea")
    wait_drawn(page, "validation loss")  # a series that came after the first frame is drawn too
    page.wait_for_function("([prev]) => { const i = document.querySelector('#train-samples img');"
                           " return i && i.src !== prev; }", arg=[first_grid])  # a newer grid came in
    run = train_app["outputs"] / "runs" / "browser_run"
    assert (run / "browser_run.safetensors").is_file() and (run / "run.toml").read_text().count("steps = 300") == 1

    # The adapter is in the library: enabled, it changes the image.
    page.get_by_role("tab", name="Generate").click()
    page.locator("#prompt textarea").fill("a red circle on a white background")
    for elem_id, v in (("steps", 4), ("width", 64), ("height", 64)):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(v))
        box.press("Enter")
    src, base = click_generate(page)
    page.locator("#library label").filter(has_text="browser_run").click()
    page.wait_for_selector("#w-browser_run")
    _, tuned = click_generate(page, src)
    assert abs(pixels(Image.open(io.BytesIO(base))) - pixels(Image.open(io.BytesIO(tuned)))).max() > 5
