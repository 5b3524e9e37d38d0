"""Screenshot the app at 1280x720 with a library of 30 adapters (not a test: run it by hand).

    HF_HUB_OFFLINE=1 .venv/bin/python tests/ui/screenshot_app.py /work/screens/app.png

Builds the tiny SD1 model and 30 adapter files (26 usable copies of random adapters, 2 truncated, 1 SDXL,
1 with a different shape) in a temp folder, starts the app on them, enables two adapters, generates one
batch and saves a screenshot of what a 1280x720 window shows.
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


def main(out: str) -> None:
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
                browser.close()
        finally:
            demo.close()
    print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/screens/app.png")
