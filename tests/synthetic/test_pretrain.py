"""Pretraining the embedded model, at a size that runs in seconds: the folder it writes loads as a model."""

import json

import torch

from imglora.pipeline import load_model
from imglora.synthetic.pretrain import Recipe, pretrain


def test_tiny_pretraining_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / "old.txt").write_text("replaced only once the new folder is complete")
    recipe = Recipe(images=48, vae_steps=2, vae_full_steps=1, vae_batch=4, steps=3, batch=4, warmup=1,
                    sample_steps=2)
    info = pretrain(out, recipe, evaluate_with_judge=False, log=lambda *_: None)
    assert not (out / "old.txt").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model = load_model(out)
    assert model.arch == "sd1" and model.resolution == 64 and model.defaults["steps"] == 2
    saved = json.loads((out / "imglora.json").read_text())["pretrain"]
    assert saved["recipe"]["steps"] == 3 and saved["results"]["unet_loss"] == info["unet_loss"]
    assert torch.isfinite(torch.tensor(info["unet_loss"]))
    assert (tmp_path / "base-samples.png").is_file()
