"""Screenshot the app at 1280x720 with a library of 30 adapters (not a test: run it by hand).

    HF_HUB_OFFLINE=1 .venv/bin/python tests/ui/screenshot_app.py /work/screens/app.png [docs/screens/app-train.png]

Builds the tiny SD1 model and 30 adapter files (26 usable copies of random adapters, 2 truncated, 1 SDXL,
1 with a different shape) in a temp folder, starts the app on them, enables two adapters, generates one
batch and saves a screenshot of what a 1280x720 window shows. In the same app it then saves, beside it and named
by its name up to the first '-' (app-after.png -> app-compare.png, app-export.png): the Compare tab after a
grid that sweeps anime over block-weight presets, and the Export tab after that blend was saved as an adapter.

With a second path, also the Train tab, in an app on the embedded model (what `imglora ui` opens; its samples
show shapes, not noise): the demo datasets made by its button (saved beside it as ...-dataset.png), a short run
of the demo recipe's dataset (about a minute on a 2-core CPU), and its Runs panel (progress, loss curves,
sample grids) at 1280x1080.
"""

import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1]), str(Path(__file__).parents[2])]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
# Where things are, in page pixels: what "above the fold" and "within reach" are measured by.
MEASURE = """() => { const top = s => { const e = document.querySelector(s); return e ? Math.round(e.getBoundingClientRect().top) : null; };
  return {page_height: document.documentElement.scrollHeight, gallery_top: top('#gallery'),
          first_weight_top: top('[id^="w-"]'), last_weight_top: (() => { const a = document.querySelectorAll('[id^="w-"]');
          return a.length ? Math.round(a[a.length - 1].getBoundingClientRect().top) : null; })()}; }"""
STYLES = ["anime", "watercolor", "pixel_art", "ink_sketch", "oil_paint", "cyberpunk", "film_grain", "low_poly",
          "claymation", "ukiyo_e", "vaporwave", "charcoal", "pastel", "neon_glow", "papercut", "blueprint",
          "stained_glass", "mosaic", "comic_halftone", "gothic", "art_nouveau", "steampunk", "retro_80s",
          "chalk", "felt_toy", "origami"]


def build_library(root: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    from helpers import random_adapter
    from imglora.formats.lora_file import save_adapter
    from imglora.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(root / "build")
    pipe.save_pretrained(root / "model")
    folder = root / "adapters"
    folder.mkdir()
    for i, name in enumerate(STYLES):
        meta = {"ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": name.replace("_", " ")}
        save_adapter(folder / f"{name}.safetensors",
                     random_adapter(pipe, "cross-attn" if i % 2 else "attn", i % 3 == 0, seed=i, scale=0.3),
                     metadata=meta)
    good = (folder / "anime.safetensors").read_bytes()
    (folder / "half_downloaded.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "git_lfs_pointer.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n"
                                                         b"oid sha256:00\nsize 9\n")
    save_adapter(folder / "sdxl_detail_tweaker.safetensors", random_adapter(pipe, "cross-attn", False, seed=99),
                 fmt="peft", metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    tensors = load_file(folder / "watercolor.safetensors")
    down = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    tensors[down] = torch.cat([tensors[down], tensors[down]], dim=1)
    save_file(tensors, str(folder / "wider_model_lora.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    return root / "model", folder


# The Train tab's run: the demo dataset at the tiny model's 64 px, long enough for a few points of each curve.
TRAIN_RUN = """steps = 120
batch_size = 4
rank = 8
lr = 0.003
val_count = 4
val_every = 20
sample_every = 40
sample_prompts = ["a red zorbly on a white background", "a blue circle on a white background"]
sample_steps = 8
"""


def main(out: str, train_out: str | None = None) -> None:
    import torch
    from playwright.sync_api import sync_playwright

    from ui.app import build_app, start
    from ui.session import Session, open_model
    from ui_helpers import free_port

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = build_library(Path(tmp))
        assert len(list(folder.glob("*.safetensors"))) == 30
        session = Session(open_model(model), folder, Path(tmp) / "outputs")
        demo = build_app(session)
        url = start(session, demo, port=free_port())
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 720})
                page.set_default_timeout(60_000)
                page.goto(url)
                for name in ("anime", "pixel_art"):  # ticked in the library, they move up with a weight slider
                    page.locator("#library label").filter(has_text=name).first.click()
                    page.wait_for_selector(f"#w-{name}")
                page.locator("#prompt textarea").fill("a red circle")
                for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("batch", 4)):
                    box = page.locator(f"#{elem_id} input[type=number]")
                    box.fill(str(value))
                    box.press("Enter")
                page.click("#generate")
                page.wait_for_selector("#gallery img")
                page.wait_for_timeout(1500)
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=out)
                print(page.evaluate(MEASURE))
                print(f"saved {out}")
                compare_tab(page, beside(out, "compare"))
                print(f"saved {beside(out, 'compare')}")
                export_tab(page, beside(out, "export"))
                print(f"saved {beside(out, 'export')}")
                browser.close()
        finally:
            demo.close()
    if train_out:
        train_screens(train_out)
        print(f"saved {train_out}")


def beside(out: str, tab: str) -> str:
    """Another tab's screenshot in the same folder: app-after.png -> app-compare.png."""
    path = Path(out)
    return str(path.with_name(f"{path.stem.split('-')[0]}-{tab}{path.suffix}"))


def choose(page, elem_id: str, option: str) -> None:
    """Pick a dropdown's option, as a person does."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def compare_tab(page, out: str) -> None:
    """The Compare tab after a grid of anime at four block-weight presets, over the blend of the Generate tab
    (anime and pixel_art enabled), at 128 px so the cells' captions fit; as tall as the cells reach."""
    for elem_id, value in (("width", 128), ("height", 128)):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    page.get_by_role("tab", name="Compare").click()
    choose(page, "grid-x", "anime")
    choose(page, "grid-x-kind", "blocks")  # the values box shows the kind's example values
    page.wait_for_function("document.querySelector('#grid-x-values textarea').value.includes('OUTD')")
    page.wait_for_timeout(500)  # that update is drawn before the box is typed in
    values = page.locator("#grid-x-values textarea")
    values.fill("NONE; ALL; IND; OUTD")
    page.wait_for_timeout(500)
    assert values.input_value() == "NONE; ALL; IND; OUTD", values.input_value()
    page.click("#render-grid")
    page.wait_for_function("document.querySelector('#grid-notes textarea').value.includes('in one batch')")
    page.wait_for_selector("#grid-image img")
    page.wait_for_selector("#grid-cells img")
    page.wait_for_timeout(1500)
    page.evaluate("window.scrollTo(0, 0)")
    # Taller than 720, down to the cells' end, so the grid, its notes and the cells show whole.
    bottom = page.evaluate("Math.max(...[...document.querySelectorAll('#grid-cells img')]"
                           ".map(e => Math.ceil(e.getBoundingClientRect().bottom)))")
    page.set_viewport_size({"width": 1280, "height": max(720, min(bottom + 24, 1080))})
    page.wait_for_timeout(500)
    page.screenshot(path=out)
    page.set_viewport_size({"width": 1280, "height": 720})


def export_tab(page, out: str) -> None:
    """The Export tab after the blend (anime and pixel_art) was saved as one adapter file."""
    page.get_by_role("tab", name="Export").click()
    page.locator("#export-name textarea, #export-name input").first.fill("anime_pixel_art")
    page.click("#export-save")
    page.wait_for_function("document.querySelector('#export-status textarea').value.startsWith('Saved')")
    page.wait_for_timeout(1500)  # the library lists the new adapter
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=out)


def train_screens(out: str) -> None:
    from playwright.sync_api import sync_playwright

    from ui.app import build_app, start
    from ui.session import Session, open_model
    from ui.tabs.train import Training
    from ui_helpers import free_port

    with tempfile.TemporaryDirectory() as tmp:

        session = Session(open_model(None), Path(tmp) / "adapters", Path(tmp) / "outputs")
        training = Training.open(session, Path(tmp) / "datasets")
        demo = build_app(session, training)
        url = start(session, demo, port=free_port(), training=training)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 1080})
                page.set_default_timeout(60_000)
                page.goto(url)
                train_tab(page, out)
                browser.close()
        finally:
            training.jobs.shutdown()
            demo.close()


def train_tab(page, out: str) -> None:
    """The Train tab as a new user gets there: the demo dataset from its button, a run started, watched."""
    import time

    page.get_by_role("tab", name="Train").click()
    page.click("#train-demo")
    page.wait_for_function("document.querySelectorAll('#train-thumbs img').length > 20")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(Path(out).with_name(Path(out).stem + "-dataset.png")))
    page.get_by_role("tab", name="Settings").click()
    page.locator("#train-toml-box").get_by_text("As TOML").click()
    page.locator("#train-toml textarea").fill(TRAIN_RUN)
    page.click("#train-toml-to-form")
    page.wait_for_function("document.querySelector('#cfg-steps input').value == '120'")
    page.click("#train-start")
    page.get_by_role("tab", name="Runs").wait_for()
    deadline = time.monotonic() + 600
    while "finished" not in page.locator("#train-status textarea").input_value() and time.monotonic() < deadline:
        page.wait_for_timeout(1000)
    page.wait_for_selector("#train-samples img")
    page.wait_for_timeout(3000)  # the last tick's plot is drawn
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/screens/app.png", sys.argv[2] if len(sys.argv) > 2 else None)
