"""Masks for --masked-loss: `check` reports those that do not fit their image, `synth --distractor` writes them."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from data_helpers import shape
from datasets_tools.check import check_folder
from datasets_tools.synth import synth
from imglora.errors import ImgloraError
from imglora.synthetic.shapes import COLOURS


def masked_folder(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    (data / "sub").mkdir(parents=True)
    masks.mkdir()
    names = ["ok", "half", "wrong", "cut", "black", "nomask", "sub/deep"]
    for i, name in enumerate(names):
        shape(size=(64, 48), seed=i).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("a red circle on a white background")
    white = Image.new("L", (64, 48), 255)
    white.save(masks / "ok.png")
    white.resize((32, 24)).save(masks / "half.jpg")  # a resize of the same aspect ratio: fits
    Image.new("L", (48, 48), 255).save(masks / "wrong.png")
    white.save(masks / "cut.png")
    (masks / "cut.png").write_bytes((masks / "cut.png").read_bytes()[:60])
    Image.new("L", (64, 48), 0).save(masks / "black.png")
    white.save(masks / "orphan.png")
    (masks / "sub").mkdir()
    white.save(masks / "sub" / "deep.png")  # subfolders mirror the data folder's
    return data, masks


def test_check_reports_masks_that_do_not_fit(tmp_path):
    data, masks = masked_folder(tmp_path)
    clean = check_folder(data, progress=False, workers=1)
    assert clean.findings == []  # without --mask-dir nothing is said about masks
    report = check_folder(data, progress=False, workers=1, mask_dir=masks)
    found = {(f.path.removeprefix(str(masks) + "/"), f.severity): f.reason for f in report.findings}
    assert found == {
        ("wrong.png", "error"): "mask 48x48 does not fit its image wrong.png (64x48, another aspect ratio)",
        ("cut.png", "error"): "unreadable mask of cut.png (truncated image (the file is cut short))",
        ("black.png", "warning"): "all-black mask: black.png trains nothing with --masked-loss",
        ("orphan.png", "warning"): "mask without an image",
    }, found
    assert all(f.kind == "mask" for f in report.findings)
    assert report.notes == [f"1 of 7 images have no mask in {masks}; with --masked-loss they train on the whole "
                            "image"]
    with pytest.raises(ImgloraError, match="no such mask folder"):
        check_folder(data, progress=False, mask_dir=tmp_path / "nope")


def test_a_mask_folder_inside_the_data_folder_holds_no_images(tmp_path):
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    shape(seed=1).save(data / "a.png")
    (data / "a.txt").write_text("a red circle")
    Image.new("L", (128, 128), 255).save(data / "masks" / "a.png")
    assert [f.reason for f in check_folder(data, progress=False, workers=1).findings] == ["missing caption"]
    report = check_folder(data, progress=False, workers=1, mask_dir=data / "masks")
    assert report.images == 1 and report.findings == [] and report.notes == []


def digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_synth_distractor_masks_cover_the_main_shape_only(tmp_path):
    plain = synth(tmp_path / "plain", 4, 0, 64, ["heart"], None, None, ["heart=zorbly"])
    for name in ("a", "b"):
        synth(tmp_path / name, 8, 2, 64, ["heart"], None, ["white"], ["heart=zorbly"],
              distractor_masks=tmp_path / f"{name}-masks")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") and digest(tmp_path / "a-masks") == digest(tmp_path / "b-masks")
    synth(tmp_path / "plain2", 4, 0, 64, ["heart"], None, None, ["heart=zorbly"])
    assert digest(tmp_path / "plain") == digest(tmp_path / "plain2") and len(plain) == 4
    report = check_folder(tmp_path / "a", progress=False, workers=1, mask_dir=tmp_path / "a-masks")
    assert report.findings == [] and report.notes == []
    for image in sorted((tmp_path / "a").glob("*.png")):
        colour = image.with_suffix(".txt").read_text().split()[1]
        rgb = np.asarray(Image.open(image), dtype=np.int16)
        mask = np.asarray(Image.open(tmp_path / "a-masks" / image.name)) > 250
        shapes = np.abs(rgb - 240).max(axis=2) > 60  # anything but the white background
        assert 0.02 < mask.mean() < 0.3
        # The mask is on pixels of the caption's colour; the other shape (another colour) lies outside it.
        inside = rgb[mask & shapes]
        assert np.abs(inside - COLOURS[colour]).max(axis=1).mean() < 40
        assert (shapes & ~mask).sum() > 30
        assert np.abs(rgb[shapes & ~mask] - COLOURS[colour]).max(axis=1).mean() > 60
    with pytest.raises(ImgloraError, match="outside the image folder"):
        synth(tmp_path / "c", 2, distractor_masks=tmp_path / "c" / "masks")
    with pytest.raises(ImgloraError, match="not an empty folder"):
        synth(tmp_path / "d", 2, distractor_masks=tmp_path / "a-masks")
