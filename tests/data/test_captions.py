"""Finding images and captions the way the trainer does: sidecars, metadata.jsonl, kohya folders, fallbacks."""

import json
import os

import pytest
from PIL import Image

from imglora.data.captions import Item, add_prefix, collect_items, read_caption, walk
from imglora.errors import ImgloraError


def image(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)
    return path


def captions(root, **kw):
    return {str(i.image.relative_to(root)): (i.caption, i.repeats, i.problem) for i in collect_items(root, **kw)}


def test_sidecars_jsonl_and_kohya_folders(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red square\n")
    image(tmp_path / "b.jpg")
    (tmp_path / "b.caption").write_text("from .caption")
    image(tmp_path / "both.png")
    (tmp_path / "both.txt").write_text("txt wins")
    (tmp_path / "both.caption").write_text("caption loses")
    image(tmp_path / "10_zorbly cat" / "c.png")
    (tmp_path / "10_zorbly cat" / "c.txt").write_text("a zorbly cat")
    image(tmp_path / "3_dog" / "deep" / "d.png")
    (tmp_path / "3_dog" / "deep" / "d.txt").write_text("a dog")
    image(tmp_path / "hf" / "train" / "e.png")
    image(tmp_path / "hf" / "f.webp")
    (tmp_path / "hf" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "train/e.png", "text": "from the root jsonl"}) + "\n\n" +
        json.dumps({"file_name": "f.webp", "caption": "the caption key works too"}) + "\n")
    assert captions(tmp_path) == {
        "a.png": ("a red square", 1, None),
        "b.jpg": ("from .caption", 1, None),
        "both.png": ("txt wins", 1, None),
        "10_zorbly cat/c.png": ("a zorbly cat", 10, None),
        "3_dog/deep/d.png": ("a dog", 3, None),  # repeats from the nearest N_ folder above
        "hf/f.webp": ("the caption key works too", 1, None),
        "hf/train/e.png": ("from the root jsonl", 1, None),
    }
    assert captions(tmp_path, caption_extensions=(".caption", ".txt"))["both.png"][0] == "caption loses"


def test_a_deeper_metadata_file_wins_and_a_sidecar_beats_both(tmp_path):
    image(tmp_path / "sub" / "x.png")
    image(tmp_path / "sub" / "y.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/x.png", "text": "outer"}) + "\n" +
                                             json.dumps({"file_name": "sub/y.png", "text": "outer y"}))
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "inner"}))
    (tmp_path / "sub" / "y.txt").write_text("sidecar")
    assert captions(tmp_path) == {"sub/x.png": ("inner", 1, None), "sub/y.png": ("sidecar", 1, None)}


def test_missing_and_empty_captions_are_problems_unless_a_fallback_is_given(tmp_path):
    image(tmp_path / "my_cat-photo (2).png")
    image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text(" \n ")
    image(tmp_path / "jsonl_empty.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "jsonl_empty.png", "text": ""}))
    image(tmp_path / "5_sks_dog" / "k.png")
    assert captions(tmp_path) == {
        "5_sks_dog/k.png": (None, 5, "missing caption"),
        "empty.png": (None, 1, "empty caption"),
        "jsonl_empty.png": (None, 1, "empty caption"),
        "my_cat-photo (2).png": (None, 1, "missing caption"),
    }
    folder = tmp_path.name.replace("_", " ")
    assert captions(tmp_path, fallback="folder") == {
        "5_sks_dog/k.png": ("sks dog", 5, None),  # a kohya folder's name without its N_ prefix
        "empty.png": (folder, 1, None),
        "jsonl_empty.png": (folder, 1, None),
        "my_cat-photo (2).png": (folder, 1, None),
    }
    by_name = captions(tmp_path, fallback="filename")
    assert by_name["my_cat-photo (2).png"][0] == "my cat photo" and by_name["5_sks_dog/k.png"][0] == "k"
    templ = captions(tmp_path, fallback="a photo of {folder}, {stem}")
    assert templ["5_sks_dog/k.png"][0] == "a photo of sks dog, k"
    for bad in ("a photo of {name}", "{0}", "a {broken"):
        with pytest.raises(ImgloraError, match="caption template"):
            collect_items(tmp_path, fallback=bad)


def test_trigger_word_prefix(tmp_path):
    for name, text in {"a": "a red circle", "b": "red, circle", "c": "zorbly, already there", "d": "zorblyx word",
                       "e": "zorbly"}.items():
        image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(text)
    image(tmp_path / "f.png")
    got = {k: v[0] for k, v in captions(tmp_path, prefix="zorbly", fallback="filename").items()}
    assert got == {"a.png": "zorbly a red circle", "b.png": "zorbly, red, circle", "c.png": "zorbly, already there",
                   "d.png": "zorbly zorblyx word", "e.png": "zorbly", "f.png": "zorbly f"}
    assert add_prefix("", "sks") == "sks" and add_prefix("x", None) == "x"


def test_read_caption_is_strict_utf8(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffcafé au lait\n".encode("utf-8"))
    assert read_caption(tmp_path / "bom.txt") == "café au lait"
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ImgloraError, match="not UTF-8") as e:
        read_caption(tmp_path / "latin1.txt")
    assert e.value.path == str(tmp_path / "latin1.txt")
    image(tmp_path / "latin1.png")
    item = collect_items(tmp_path)[0]
    assert item.caption is None and "not UTF-8" in item.problem


@pytest.mark.parametrize("content", ['{"text": "no file name"}', "not json", '["a list"]', '{"file_name": 3}'])
def test_a_malformed_metadata_jsonl_is_one_line_error(tmp_path, content):
    image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(content + "\n")
    with pytest.raises(ImgloraError, match="line 1") as e:
        collect_items(tmp_path)
    assert e.value.path == str(tmp_path / "metadata.jsonl")


def test_order_is_sorted_and_hidden_files_and_folders_are_skipped(tmp_path):
    for rel in ["b/2.png", "b/10.png", "a.png", "c.jpg", ".hidden.png", "._c.jpg", ".imglora-backup/x/a.png",
                "z/.cache/y.png"]:
        image(tmp_path / rel)
    (tmp_path / "notes.md").write_text("ignored")
    items = collect_items(tmp_path, fallback="filename")
    assert [str(i.image.relative_to(tmp_path)) for i in items] == ["a.png", "c.jpg", "b/10.png", "b/2.png"]
    assert items == collect_items(tmp_path, fallback="filename")
    assert all(isinstance(i, Item) for i in items)


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    image(data / "a.png")
    image(outside / "o.png")
    os.symlink(outside, data / "linked")
    os.symlink(outside, data / "linked_again")
    os.symlink(data, data / "loop")
    found = walk(data)
    assert [p.relative_to(data).as_posix() for p in found.images] == ["a.png", "linked/o.png"]
    reasons = {p.name: why for p, why in found.skipped}
    assert "symlink loop" in reasons["loop"] and "already included" in reasons["linked_again"]
    assert len(collect_items(data, fallback="filename")) == 2


def test_a_missing_folder_is_one_line_error(tmp_path):
    with pytest.raises(ImgloraError, match="no such folder"):
        collect_items(tmp_path / "nope")
