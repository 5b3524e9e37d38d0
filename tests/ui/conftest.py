"""One tiny SD1 model, an adapters folder with good, broken, foreign and hostile files, and one running app.

Every ui test shares them (session scope): building the pipeline and starting Gradio dominate the time.
"""

import os

import pytest
import torch

from imglora.formats.lora_file import save_adapter
from imglora.lora.adapters import Adapters
from helpers import random_adapter
from ui_helpers import SETTINGS, free_port


def _random_adapter(pipe, seed: int, preset: str, text_encoder: bool, scale: float = 0.3):
    return random_adapter(pipe, preset, text_encoder, seed=seed, scale=scale)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds long: on a shared CPU, OpenMP's spin-waits between two threads
    made each generation 20x slower (2 s instead of 0.1 s). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ui_files(tmp_path_factory):
    """{"model", "adapters", "outputs", "outside"} paths; the adapters folder holds:

    style_a (cross-attn + text encoder), style_b (self+cross attn), huge (finite values that overflow to Inf),
    broken (truncated), foreign (an SDXL adapter), escape (a symlink to a valid adapter outside the folder),
    notes.pt (not safetensors).
    """
    from imglora.models.tiny import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("ui")
    pipe = tiny_sd_pipeline(root / "build")
    pipe.save_pretrained(root / "model")
    folder = root / "adapters"
    folder.mkdir()
    save_adapter(folder / "style_a.safetensors", _random_adapter(pipe, 0, "cross-attn", True))
    save_adapter(folder / "style_b.safetensors", _random_adapter(pipe, 1, "attn", False))
    save_adapter(folder / "huge.safetensors", _random_adapter(pipe, 2, "cross-attn", False, scale=1e18))
    good = (folder / "style_a.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(good[: len(good) // 2])
    save_adapter(folder / "foreign.safetensors", _random_adapter(pipe, 3, "cross-attn", False), fmt="peft",
                 metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    outside = root / "outside"
    outside.mkdir()
    save_adapter(outside / "secret.safetensors", _random_adapter(pipe, 4, "cross-attn", False))
    os.symlink(outside / "secret.safetensors", folder / "escape.safetensors")
    torch.save({"x": torch.zeros(1)}, folder / "notes.pt")
    return {"root": root, "model": root / "model", "adapters": folder, "outputs": root / "outputs",
            "outside": outside}


@pytest.fixture(scope="session")
def session(ui_files):
    from ui.session import Session, open_model

    return Session(open_model(ui_files["model"]), ui_files["adapters"], ui_files["outputs"], max_upload_mb=1)


@pytest.fixture(scope="session")
def reference(ui_files):
    """The library alone: a second pipeline with style_a and style_b attached, for expected images."""
    from imglora.pipeline import attach, load_model

    model = load_model(ui_files["model"])
    adapters = Adapters(model.pipe)
    for name in ("style_a", "style_b"):
        attach(model, adapters, ui_files["adapters"] / f"{name}.safetensors", weight=0.0, name=name)
    return model, adapters


@pytest.fixture(scope="session")
def app_url(session):
    from ui.app import build_app, start

    demo = build_app(session)
    url = start(session, demo, port=free_port())
    yield url
    demo.close()


@pytest.fixture
def client(app_url):
    """A fresh gradio_client: its own session, so its own blend."""
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="session")
def expected(reference):
    """expected({"style_a": 0.8, ...}, prompt=..., seed=...) -> the library's own image for that blend."""
    from imglora.generate import GenerateArgs, generate

    model, adapters = reference

    def make(weights: dict, prompt: str = "a red circle", seed: int = 0, **kw):
        """weights: name -> weight, or name -> (weight, text-encoder weight)."""
        for name in adapters.names:
            w = weights.get(name, 0.0)
            w, te = w if isinstance(w, tuple) else (w, None)
            adapters.set_weight(name, w, te)
        args = GenerateArgs(prompt, seed=seed, **{**SETTINGS, **kw})
        return generate(model, args, adapters)[0]

    return make


@pytest.fixture
def audit_opens():
    """Records the paths of every open() in this process (the server's threads included) while active."""
    import sys

    state = _AUDIT
    if not state["installed"]:
        def hook(event, args):
            if state["on"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                state["paths"].append(os.fsdecode(args[0]))
        sys.addaudithook(hook)  # audit hooks cannot be removed; this one is inert unless "on"
        state["installed"] = True
    state["paths"] = []
    state["on"] = True
    yield state["paths"]
    state["on"] = False


_AUDIT = {"installed": False, "on": False, "paths": []}


@pytest.fixture(scope="session")
def train_files(tmp_path_factory):
    """Empty datasets, adapters and outputs folders for the Train tab, a captioners folder with a tiny WD tagger,
    and a folder outside all of them."""
    from ui_helpers import tiny_tagger

    root = tmp_path_factory.mktemp("train")
    files = {k: root / k for k in ("datasets", "adapters", "outputs", "captioners", "outside")}
    for folder in files.values():
        folder.mkdir()
    tiny_tagger(files["captioners"] / "tagger")
    return files


@pytest.fixture(scope="session")
def train_app(train_files):
    """The app on the embedded model (what a new user's `imglora ui` opens) with its Train tab; yields
    {"url", "session", "training"} and the train_files paths. Runs still going at the end are stopped."""
    from ui.app import build_app, start
    from ui.tabs.train import Training
    from ui.session import Session, open_model

    session = Session(open_model(None), train_files["adapters"], train_files["outputs"])
    training = Training.open(session, train_files["datasets"], train_files["captioners"])
    demo = build_app(session, training)
    url = start(session, demo, port=free_port(), training=training)
    yield {"url": url, "session": session, "training": training, **train_files}
    training.jobs.shutdown()
    demo.close()
