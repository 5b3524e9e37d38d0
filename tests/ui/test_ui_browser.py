"""A real browser (Debian's chromium, driven by Playwright) uses the page as a person would."""

import io
import os
import re

import pytest
from ui_helpers import SETTINGS, click_generate, pixels, same_image

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


def enable(page, name: str) -> None:
    """Tick an adapter in the library; it moves up to the enabled ones, with its weight slider."""
    page.locator("#library label").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$")).click()
    page.wait_for_selector(f"#w-{name}")


def dismiss_toasts(page) -> None:
    """Close the messages: a toast lies over the prompt box, and the next fill would wait until it goes."""
    for button in page.locator("[data-testid=toast-close]").all():
        button.click()
    page.locator(".toast-body").first.wait_for(state="detached")


def test_enable_two_adapters_set_weights_generate_and_change_a_weight(page, expected):
    from PIL import Image

    # The broken file is listed with its reason; the usable adapters are in the library, ticked to enable.
    page.wait_for_selector("#library label")
    assert "incomplete safetensors" in page.locator("#unusable textarea").input_value()
    enable(page, "style_a")
    enable(page, "style_b")
    set_number(page, "w-style_a", 0.8)
    set_number(page, "w-style_b", -0.5)
    page.wait_for_function("document.querySelector('#blend-summary textarea').value == 'style_a 0.8, style_b -0.5'")
    page.locator("#prompt textarea").fill("a red circle")
    for elem_id, value in (("steps", SETTINGS["steps"]), ("guidance", SETTINGS["guidance"]),
                           ("width", SETTINGS["width"]), ("height", SETTINGS["height"])):
        set_number(page, elem_id, value)

    src, first = click_generate(page)
    first = Image.open(io.BytesIO(first))
    assert first.text["parameters"].startswith("a red circle <lora:style_a:0.8> <lora:style_b:-0.5>")
    assert same_image(first, expected({"style_a": 0.8, "style_b": -0.5}))

    set_number(page, "w-style_a", 1.6)  # only a number changes; the next image uses it
    page.wait_for_function("document.querySelector('#blend-summary textarea').value.startsWith('style_a 1.6')")
    _, second = click_generate(page, src)
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


def box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def test_a_library_of_thirty_adapters_fits_a_1280x720_window(page, session):
    """Enabled adapters first with their weights in reach, a search box, the gallery above the fold and
    every unusable file with its whole reason."""
    folder, catalogue = session.catalogue.folder, session.catalogue
    copies = [folder / f"lib_{i:02d}.safetensors" for i in range(24)]
    for path in copies:
        os.link(folder / "style_b.safetensors", path)
    try:
        catalogue.scan()
        assert len(catalogue.entries) >= 30
        page.set_viewport_size({"width": 1280, "height": 720})
        page.goto(page.url)
        page.wait_for_function(f"document.querySelectorAll('#library label').length == {len(catalogue.names())}")
        assert box(page, "#gallery")["y"] + box(page, "#gallery")["height"] <= 720  # wholly above the fold
        shown = page.locator("#unusable textarea").input_value()
        for entry in catalogue.entries.values():  # every reason in full, with its file
            assert (f"• {entry.path.name}: {entry.error}" in shown) == (entry.error is not None), entry.name

        page.locator("#adapter-search").get_by_role("textbox").fill("lib_07")
        page.wait_for_function("document.querySelectorAll('#library label').length == 1")
        enable(page, "lib_07")
        page.locator("#adapter-search").get_by_role("textbox").fill("")
        page.wait_for_function(f"document.querySelectorAll('#library label').length == {len(catalogue.names()) - 1}")
        enable(page, "style_a")
        # Enabled ones are first, their sliders in view without scrolling past the library.
        assert page.evaluate("window.scrollY") == 0
        for name in ("lib_07", "style_a"):
            weight = box(page, f"#w-{name}")
            assert weight["y"] + weight["height"] <= 720 and weight["y"] < box(page, "#library")["y"], name
        set_number(page, "w-lib_07", 0.4)
        page.wait_for_function("document.querySelector('#blend-summary textarea').value == 'lib_07 0.4, style_a 1'")
        page.locator("#on-lib_07 input[type=checkbox]").uncheck()  # back into the library
        page.wait_for_function("document.querySelector('#blend-summary textarea').value == 'style_a 1'")
        page.locator("#w-lib_07").wait_for(state="detached")
    finally:
        for path in copies:
            path.unlink()
        catalogue.scan()
        page.set_viewport_size({"width": 1400, "height": 1600})
        page.goto(page.url)


def test_progress_interrupt_batch_parameters_and_png_info(page, session, tmp_path):
    """While generating: the step and time left, an Interrupt that works, and the gallery never cleared by
    an error. Every image of a batch has its parameters; a dropped PNG's parameters make the same image."""
    import time

    page.goto(page.url)
    page.wait_for_selector("#library label")
    enable(page, "style_a")
    set_number(page, "w-style_a", 0.7)
    page.locator("#prompt textarea").fill("a red circle")
    for elem_id, value in (("steps", 3), ("width", 32), ("height", 32), ("batch", 2), ("seed", 11)):
        if elem_id == "seed":
            page.locator("#seed input").fill(str(value))
        else:
            set_number(page, elem_id, value)
    page.wait_for_function("document.querySelector('#blend-summary textarea').value == 'style_a 0.7'")
    src, _ = click_generate(page)
    page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2")
    png = tmp_path / "dropped.png"  # the second image, as the browser got it
    png.write_bytes(page.request.get(page.locator("#gallery img").nth(1).get_attribute("src")).body())
    page.locator("#gallery img").nth(1).click()  # the second image's own parameters
    page.wait_for_function("document.querySelector('#parameters textarea').value.includes('Seed: 12,')")
    second = page.locator("#parameters textarea").input_value()
    assert second.startswith("a red circle <lora:style_a:0.7>\nSteps: 3")
    shown = "() => [...document.querySelectorAll('#gallery img')].map(i => i.src).sort().join(' ')"
    before = page.evaluate(shown)

    def slow(module, args):
        time.sleep(0.15)
    handle = session.pipe.unet.register_forward_pre_hook(slow)
    try:
        set_number(page, "steps", 60)
        page.click("#generate")
        page.wait_for_function("() => /step \\d+\\/60, about \\d+ s left/.test("
                               "document.querySelector('#gen-status').innerText)")
        page.click("#interrupt")
        page.locator(".toast-body").filter(has_text=re.compile(r"interrupted at step \d+ of 60")).first.wait_for()
    finally:
        handle.remove()
    dismiss_toasts(page)
    set_number(page, "steps", 3)
    page.locator("#prompt textarea").fill("a red circle <lora:nope:1>")  # a bad setting
    page.click("#generate")
    page.locator(".toast-body").filter(has_text="no adapter named 'nope'").first.wait_for()
    dismiss_toasts(page)
    # The gallery keeps its images: the errors showed in the status line and the toasts, not over it.
    assert page.locator("#gallery img").first.is_visible() and page.evaluate(shown) == before
    assert "Error" not in page.locator("#gallery").inner_text()

    # PNG info: drop the second image, send its parameters back, generate: the same image again.
    page.locator("#on-style_a input[type=checkbox]").uncheck()  # the blend comes back from the PNG
    page.wait_for_function("document.querySelector('#blend-summary textarea').value.startsWith('no adapters')")
    page.click("#png-info")
    page.locator("#png-drop input[type=file]").set_input_files(str(png))
    page.wait_for_function("document.querySelector('#png-parameters textarea').value.includes('Seed: 12,')")
    assert page.locator("#png-parameters textarea").input_value() == second
    page.click("#send-to-generate")
    page.wait_for_function("document.querySelector('#blend-summary textarea').value == 'style_a 0.7'")
    assert page.locator("#prompt textarea").input_value() == "a red circle"
    assert page.locator("#seed input").input_value() == "12"
    set_number(page, "batch", 1)
    _, again = click_generate(page, src)
    from PIL import Image

    assert same_image(Image.open(io.BytesIO(again)), Image.open(png), tol=0)


@pytest.fixture
def listener():
    """A local HTTP server that records every request it gets: nothing in the page may reach it."""
    import http.server
    import threading

    hits = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hits
    server.shutdown()


def test_markup_in_adapter_metadata_file_names_and_uploads_stays_text(page, session, ui_files, listener, tmp_path):
    """RELIABILITY.md §3: metadata, file names, error reasons and PNG text are someone else's; in the page
    they appear literally and the browser fetches nothing they name."""
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from imglora.formats.lora_file import load_adapter, save_adapter

    port, hits = listener
    url = f"http://127.0.0.1:{port}"
    img = f"<img src={url}/trigger onerror=\"fetch('{url}/onerror')\">"
    md = f"![x]({url}/md)"
    js_url = "String.fromCharCode(" + ",".join(str(ord(c)) for c in f"{url}/name") + ")"
    named = f"<img src=x onerror=this.src={js_url}>"  # a file name may hold markup (no '/' needed)
    folder, catalogue = session.catalogue.folder, session.catalogue
    adapter, _ = load_adapter(ui_files["adapters"] / "style_b.safetensors")
    save_adapter(folder / "hostile.safetensors", adapter, metadata={
        "ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": img, "modelspec.title": f"[link]({url}/link)",
        "ss_tag_frequency": json.dumps({"d": {md: 3, f"<img src={url}/tag>": 2}})})
    header = json.dumps({"t": {"dtype": f"<img src={url}/dtype>", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (folder / f"{named}.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    png = tmp_path / "hostile.png"
    info = PngInfo()
    info.add_text("parameters", f"a cat {img} {md}\nSteps: 2, Sampler: DDIM, CFG scale: 3, Seed: 1, Size: 32x32")
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    upload = tmp_path / "upload.safetensors"  # Gradio strips '<>' from uploaded names; the header keeps them
    header = json.dumps({"t": {"dtype": f"<img src={url}/upload>", "shape": [1], "data_offsets": [0, 4]}}).encode()
    upload.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    fetched = []
    page.on("request", lambda r: fetched.append(r.url) if f":{port}" in r.url else None)
    try:
        catalogue.scan()
        page.goto(page.url)
        page.locator("#adapter-search").get_by_role("textbox").fill("trigger")  # found by its trigger words
        page.wait_for_function("document.querySelectorAll('#library label').length == 1")
        enable(page, "hostile")
        page.click("text=hostile card")
        page.wait_for_function("document.querySelector('#card-hostile textarea').value.includes('trigger words')")
        card = page.locator("#card-hostile textarea").input_value()
        assert f"- trigger words: {img}" in card and f"- top tags: {md} (3), <img src={url}/tag> (2)" in card
        page.locator("#adapter-search").get_by_role("textbox").fill("")
        page.wait_for_function("document.querySelector('#unusable textarea')?.value.includes('dtype')")
        unusable = page.locator("#unusable textarea").input_value()
        assert f"• {named}.safetensors: malformed entry for tensor 't' (unknown dtype <img src={url}/dtype>)" in unusable

        page.click("text=Upload an adapter")
        page.locator("#upload input[type=file]").set_input_files(str(upload))
        # The error quotes the file's text; the toast shows it as text (Gradio renders toasts as HTML).
        page.locator(".toast-body").filter(has_text=f"upload.safetensors: malformed entry for tensor 't' "
                                                    f"(unknown dtype <img src={url}/upload>)").first.wait_for()

        page.click("#png-info")
        page.locator("#png-drop input[type=file]").set_input_files(str(png))
        page.wait_for_function("document.querySelector('#png-parameters textarea').value.startsWith('a cat')")
        assert page.locator("#png-parameters textarea").input_value().startswith(f"a cat {img} {md}")
        page.click("#send-to-generate")
        page.wait_for_function("document.querySelector('#prompt textarea').value.startsWith('a cat <img')")
        page.wait_for_timeout(500)  # time for any image the page might load
        assert page.locator(f"img[src*=':{port}']").count() == 0 and page.locator(f"a[href*=':{port}']").count() == 0
    finally:
        for path in (folder / "hostile.safetensors", folder / f"{named}.safetensors"):
            path.unlink()
        catalogue.scan()
    assert hits == [] and fetched == []


def choose(page, elem_id: str, option: str) -> None:
    """Pick a dropdown's option, as a person does."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def summary_is(page, text: str) -> None:
    page.wait_for_function("([t]) => document.querySelector('#blend-summary textarea').value == t", arg=[text])


def test_a_block_preset_picked_in_the_page_gives_the_librarys_image(page, expected):
    """The row's block preset, its editor of block weights and its steps change the blend, nothing else."""
    from PIL import Image

    page.goto(page.url)
    page.wait_for_selector("#library label")
    enable(page, "style_a")
    page.locator("#prompt textarea").fill("a red circle")
    for elem_id, value in (("steps", SETTINGS["steps"]), ("guidance", SETTINGS["guidance"]),
                           ("width", SETTINGS["width"]), ("height", SETTINGS["height"])):
        set_number(page, elem_id, value)
    choose(page, "blocks-style_a", "blocks: IND")
    summary_is(page, "style_a 1 (blocks IND)")
    _, data = click_generate(page)
    image = Image.open(io.BytesIO(data))
    assert image.text["parameters"].startswith("a red circle <lora:style_a:1:lbw=IND>\nSteps: 2")
    # IND keeps BASE (the text encoders) and none of the tiny UNet's blocks (IN03, M00, OUT00, OUT01).
    assert same_image(image, expected({"style_a": (0.0, 1.0)}))

    page.click("text=style_a card")  # the editor shows the preset's numbers; typing one makes it custom
    assert [page.locator(f"#bw-style_a-{b} input").input_value() for b in ("BASE", "IN03", "M00")] == ["1", "0", "0"]
    page.locator("#bw-style_a-M00 input").fill("0.5")
    summary_is(page, "style_a 1 (blocks 1,0,0,0,0,0.5,0,0,0,0,0,0)")
    assert page.locator("#blocks-style_a input").input_value() == "blocks: custom"
    steps = page.locator("#steps-style_a textarea, #steps-style_a input").first
    steps.fill("stop=1")
    steps.press("Enter")
    summary_is(page, "style_a 1 (blocks 1,0,0,0,0,0.5,0,0,0,0,0,0; steps stop=1)")
    choose(page, "blocks-style_a", "blocks: off")
    summary_is(page, "style_a 1 (steps stop=1)")
    assert page.locator("#bw-style_a-M00 input").input_value() == "1"
