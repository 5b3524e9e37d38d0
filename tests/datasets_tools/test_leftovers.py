"""A killed `imglora-data convert`, `caption` or `resize` leaves temp files; the next run on that folder
removes them."""

import json
import os

import pytest

from data_helpers import shape
from datasets_tools.caption import BACKUP_DIR, MANIFEST
from datasets_tools.cli import main
from imglora.formats.files import TMP_MARK


def dataset(root):
    (root / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png"):
        shape(seed=len(rel)).save(root / rel)
        (root / rel).with_suffix(".txt").write_text("a red circle")
    return root


def plant(folder, kind: str):
    """What a kill leaves: the temp file of an atomic write (beside its target), or an atomic folder's temp folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "dir":
        path = folder / f".out{TMP_MARK}abc123"
        path.mkdir()
        (path / "half.png").write_bytes(b"half")
    else:
        path = folder / f".{kind}{TMP_MARK}x1y2z3"
        path.write_bytes(b"half a file")
    return path


def test_a_killed_resize_leaves_nothing_after_the_next_run(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    out = tmp_path / "out"
    left = [plant(out, "a.png"), plant(out / "sub", "b.txt"), plant(out / "sub", "dir"), plant(out, "metadata.jsonl")]
    assert main(["resize", str(root), str(out), "--quiet"]) == 0
    assert not any(p.exists() for p in left)
    assert "removed 4 leftover(s) of an interrupted run" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.png", "a.txt", "sub", "sub/b.png",
                                                                            "sub/b.txt"]


def test_a_killed_convert_leaves_nothing_after_the_next_run(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    # In place: caption files beside the images, and the backup folder of the files it replaces.
    left = [plant(root, "metadata.jsonl"), plant(root / "sub", "metadata.jsonl"), plant(root / "sub", "b.txt")]
    assert main(["convert", str(root), "--to", "jsonl"]) == 0
    assert not any(p.exists() for p in left)
    assert (root / "metadata.jsonl").is_file() and (root / "sub" / "metadata.jsonl").is_file()
    # Into --out: every folder of the copy.
    out = tmp_path / "copy"
    left = [plant(out, "metadata.jsonl"), plant(out / "sub", "b.png"), plant(out / "sub", "dir")]
    assert main(["convert", str(root), "--to", "sidecar", "--out", str(out)]) == 0
    assert not any(p.exists() for p in left)
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]
    capsys.readouterr()


def test_a_killed_caption_edit_leaves_nothing_after_the_next_run(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    assert main(["caption", str(root), "--trigger", "zorbly"]) == 0
    done = next((root / BACKUP_DIR).iterdir())  # a finished backup: kept, --restore needs it
    # A run killed while backing up (no manifest yet, so no caption was changed), one killed while writing
    # its manifest, and one killed while writing a caption.
    unfinished = root / BACKUP_DIR / "20000101-000000"
    (unfinished / "sub").mkdir(parents=True)
    (unfinished / "sub" / "b.txt").write_text("a red ci")
    left = [unfinished, plant(root / BACKUP_DIR / "20000101-000001", MANIFEST), plant(root, "a.txt"),
            plant(root / "sub", "b.txt")]
    capsys.readouterr()
    assert main(["caption", str(root), "--dry-run", "--dedupe", "--trigger", "again"]) == 0  # a dry run writes nothing
    assert all(p.exists() for p in left)
    assert main(["caption", str(root), "--trigger", "again"]) == 0
    assert not any(p.exists() for p in left)
    backups = sorted(p.name for p in (root / BACKUP_DIR).iterdir())
    assert done.name in backups and len(backups) == 2 and all((root / BACKUP_DIR / b / MANIFEST).is_file()
                                                                for b in backups)
    assert (root / "a.txt").read_text().strip() == "again zorbly a red circle"
    # --restore cleans too, then puts the first backup's files back.
    left = [plant(root, "a.txt")]
    assert main(["caption", str(root), "--restore", str(done)]) == 0
    assert not any(p.exists() for p in left) and (root / "a.txt").read_text().strip() == "a red circle"
    assert json.loads((done / MANIFEST).read_text())["changed"] == ["a.txt", "sub/b.txt"]
    capsys.readouterr()


@pytest.mark.parametrize("command", ["resize", "convert"])
def test_cleaning_never_touches_the_input_or_follows_links(tmp_path, command):
    root = dataset(tmp_path / "d")
    theirs = plant(root, "a.png")  # in DIR: resize and convert --out never write there
    elsewhere = tmp_path / "elsewhere"
    kept = plant(elsewhere, "x.png")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / "link")
    argv = {"resize": ["resize", str(root), str(out), "--quiet"],
            "convert": ["convert", str(root), "--to", "jsonl", "--out", str(out)]}[command]
    assert main(argv) == 0
    assert theirs.exists() and kept.exists()
