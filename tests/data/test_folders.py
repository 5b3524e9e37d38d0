"""Folders mean what they say: kohya repeat folders only with a plausible count, and every decision reported."""

import os

import pytest
from PIL import Image

from imglora.config import TrainConfig
from imglora.data.captions import MAX_REPEATS, collect_items, folder_notes, repeat_folder, walk
from imglora.train.data import build_data


def image(path, caption="a red square", size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


@pytest.mark.parametrize("name,repeats", [
    ("10_cats", 10), ("1_x", 1), (f"{MAX_REPEATS}_x", MAX_REPEATS), ("05_sorted", 5),
    ("2024_photos", None), ("1999_holiday", None), ("0_x", None), (f"{MAX_REPEATS + 1}_x", None),
    ("photos", None), ("10cats", None), ("_x", None), ("10_", None),
])
def test_a_repeat_folder_needs_a_plausible_count(name, repeats):
    assert repeat_folder(name)[0] == repeats
    looks_like_one = name[:1].isdigit() and "_" in name and not name.endswith("_")
    assert (repeat_folder(name)[1] is not None) == (repeats is None and looks_like_one)


def test_collect_items_and_its_notes(tmp_path):
    image(tmp_path / "10_cats" / "a.png")
    image(tmp_path / "2024_photos" / "b.png")
    image(tmp_path / "0_x" / "c.png")
    image(tmp_path / "5_dogs" / "2024_trip" / "d.png")  # the nearest plausible folder counts
    (tmp_path / "3_empty").mkdir()
    (tmp_path / "3_empty" / "notes.md").write_text("no images here")
    notes = []
    items = {i.image.relative_to(tmp_path).as_posix(): i.repeats for i in collect_items(tmp_path, log=notes.append)}
    assert items == {"0_x/c.png": 1, "10_cats/a.png": 10, "2024_photos/b.png": 1, "5_dogs/2024_trip/d.png": 5}
    assert notes == [
        f"folder {tmp_path / '0_x'}: not a repeat folder (0 repeats is implausible; repeat folders have 1 to 1000); "
        "its images count once",
        f"folder {tmp_path / '10_cats'}: 10 repeats",
        f"folder {tmp_path / '2024_photos'}: not a repeat folder (2024 repeats is implausible; repeat folders have 1 "
        "to 1000); its images count once",
        f"folder {tmp_path / '5_dogs'}: 5 repeats",
        f"folder {tmp_path / '5_dogs' / '2024_trip'}: not a repeat folder (2024 repeats is implausible; repeat "
        "folders have 1 to 1000); its images count once",
    ]  # a folder without images (3_empty) decides nothing
    captions = {i.image.name: i.caption for i in collect_items(tmp_path, fallback="folder", log=None)}
    assert captions["a.png"] == "a red square"
    image(tmp_path / "2024_photos" / "e.png", caption=None)
    image(tmp_path / "10_cats" / "f.png", caption=None)
    captions = {i.image.name: i.caption for i in collect_items(tmp_path, fallback="folder", log=None)}
    assert captions["e.png"] == "2024 photos" and captions["f.png"] == "cats"  # only a real prefix is cut


def _unreadable(monkeypatch, name: str):
    """A folder that cannot be listed (tests run as root, which chmod cannot lock out)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == name:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_folder_is_reported_not_skipped_silently(tmp_path, monkeypatch, capsys):
    image(tmp_path / "ok" / "a.png")
    image(tmp_path / "locked" / "b.png")
    _unreadable(monkeypatch, "locked")
    assert [p.name for p, _ in walk(tmp_path).skipped] == ["locked"]
    items = collect_items(tmp_path)  # the trainer's call: notes go to stderr
    assert [i.image.name for i in items] == ["a.png"]
    err = capsys.readouterr().err
    assert f"note: folder {tmp_path / 'locked'}: skipped, unreadable folder (Permission denied)" in err
    notes = folder_notes(tmp_path, walk(tmp_path))
    assert notes == [f"folder {tmp_path / 'locked'}: skipped, unreadable folder (Permission denied)"]


def test_the_trainers_data_loading_reports_its_decisions(tmp_path, capsys):
    image(tmp_path / "data" / "2024_photos" / "a.png")
    image(tmp_path / "data" / "4_x" / "b.png")
    said = []
    data = build_data(TrainConfig(data=str(tmp_path / "data")), 64, log=said.append)  # the trainer's own log
    assert sorted(e.path.name for e in data.examples) == ["a.png"] + ["b.png"] * 4
    err = "\n".join(said)
    assert "folder " + str(tmp_path / "data" / "2024_photos") + ": not a repeat folder (2024 repeats is implausible" \
        in err
    assert "folder " + str(tmp_path / "data" / "4_x") + ": 4 repeats" in err


def test_the_trigger_is_never_added_to_regularisation_captions(tmp_path):
    image(tmp_path / "data" / "a.png", "a heart")
    image(tmp_path / "reg" / "b.png", "a red circle")
    for weight in (1.0, 0.5):
        cfg = TrainConfig(data=str(tmp_path / "data"), reg_data=str(tmp_path / "reg"), trigger="zorbly",
                          prior_loss_weight=weight)
        captions = {e.path.name: e.caption for e in build_data(cfg, 64, log=lambda _: None).examples}
        assert captions["a.png"].startswith("zorbly") and captions["a.png"].endswith("a heart"), weight
        assert captions["b.png"] == "a red circle", weight
