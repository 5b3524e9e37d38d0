"""Helpers shared by the ui tests."""

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

SETTINGS = dict(steps=2, guidance=3.0, width=32, height=32)  # tiny and fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(path_or_image):
    import numpy as np
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB")).astype(int)


def same_image(a, b, tol: int = 1) -> bool:
    """Equal up to 8-bit rounding of float noise."""
    return int(abs(pixels(a) - pixels(b)).max()) <= tol


def in_folder(path: str, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(folder)


def http_status(url: str) -> int:
    """The HTTP status of a GET, errors included."""
    try:
        with urllib.request.urlopen(url) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# The fastest run that still shows everything: 32 px (bucket step 32), batch 2, rank 4, a sample grid and a
# validation loss every 50 steps (about 50 steps a second on the embedded model, one thread, idle machine).
FAST_RUN = """\
steps = 200
resolution = 32
bucket_step = 32
batch_size = 2
rank = 4
lr = 0.01
val_count = 2
val_every = 50
sample_every = 50
sample_prompts = ["a red circle on a white background"]
sample_steps = 2
workers = 1
"""


def tiny_tagger(folder: Path) -> Path:
    """A WD tagger in SmilingWolf's layout (model.onnx + selected_tags.csv) whose scores are set by its weights:
    'red theme' on red images, 'blue theme' on blue ones, always 'simple background' (mean BGR in, a score out)."""
    import csv

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tags = [("general", 9, 0.9, 0, 0, 0), ("simple_background", 0, 0.9, 0, 0, 0),
            ("red_theme", 0, 0.0, 0, -4, 4), ("blue_theme", 0, 0.0, 4, -4, 0)]  # R - G, B - G: 0 on white or grey
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[3:] for t in tags], np.float32).T / 255  # (3 BGR, tags)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["mixed"]), helper.make_node("Add", ["mixed", "base"], ["raw"]),
         helper.make_node("Clip", ["raw", "lo", "hi"], ["predictions_sigmoid"])],
        "tagger", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", len(tags)])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([t[2] for t in tags], np.float32),
                                                                        "base"),
         numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(1, np.float32), "hi")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        w.writerows([i, t[0], t[1], 100] for i, t in enumerate(tags))
    return folder


def click_generate(page, previous_src: str | None = None) -> tuple[str, bytes]:
    """In a browser page: click Generate; returns the new gallery image's URL and bytes (once it differs from
    `previous_src`)."""
    page.click("#generate")
    page.wait_for_function("([prev]) => { const i = document.querySelector('#gallery img');"
                           " return i && i.src && i.src !== prev; }", arg=[previous_src])
    src = page.locator("#gallery img").first.get_attribute("src")
    return src, page.request.get(src).body()
