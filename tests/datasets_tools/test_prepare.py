"""caption, resize, convert, stats and synth: what they write, and that DIR is left alone where promised."""

import json
import os

import pytest
from PIL import Image

from data_helpers import exit_code, shape, tree_hash
from datasets_tools.cli import main
from imglora.data.captions import collect_items


def folder(tmp_path, captions, name="data"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    for i, (stem, text) in enumerate(captions.items()):
        shape(seed=i).save(d / f"{stem}.png")
        if text is not None:
            (d / f"{stem}.txt").write_text(text)
    return d


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imglora-data: ") and all(w in err[0] for w in words), err


# -- caption ----------------------------------------------------------------------------------------
def test_caption_edits_with_dry_run_backup_and_restore(tmp_path, capsys):
    d = folder(tmp_path, {"a": "red, circle, red, white background", "b": "blue, square", "my_cat_photo": None,
                          "kept": "a sentence,  with spacing"})
    before = tree_hash(d)
    args = ["caption", str(d), "--trigger", "zorbly", "--replace", "red=crimson", "--remove", "square", "--dedupe",
            "--create-missing", "filename"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+zorbly, crimson, circle, white background" in out and "+zorbly my cat photo" in out
    assert "--- /dev/null" in out and "+++ b/my_cat_photo.txt" in out
    assert tree_hash(d) == before  # a dry run writes nothing
    assert main(args) == 0
    assert (d / "a.txt").read_text().strip() == "zorbly, crimson, circle, white background"
    assert (d / "b.txt").read_text().strip() == "zorbly blue"
    assert (d / "my_cat_photo.txt").read_text().strip() == "zorbly my cat photo"
    assert (d / "kept.txt").read_text().strip() == "zorbly, a sentence,  with spacing"  # untouched tags keep spacing
    backup = next((d / ".imglora-backup").iterdir())
    assert (backup / "a.txt").read_text() == "red, circle, red, white background"
    assert json.loads((backup / "manifest.json").read_text())["created"] == ["my_cat_photo.txt"]
    assert [i.caption for i in collect_items(d)][0].startswith("zorbly")  # the backup is not training data
    capsys.readouterr()
    assert main(args) == 0  # idempotent: the trigger is not added twice
    assert "0 caption file(s) changed" in capsys.readouterr().err
    assert len(list((d / ".imglora-backup").iterdir())) == 1  # no backup without a change
    assert main(["caption", str(d), "--restore", str(backup)]) == 0
    assert not (d / "my_cat_photo.txt").exists()
    assert (d / "a.txt").read_text() == "red, circle, red, white background"
    assert (d / "b.txt").read_text() == "blue, square"


def test_caption_edits_caption_files_where_they_are_and_leaves_jsonl_captions(tmp_path, capsys):
    d = folder(tmp_path, {"a": None, "b": None, "c": None})
    (d / "a.caption").write_text("from caption file")
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "from jsonl"}) + "\n")
    assert main(["caption", str(d), "--trigger", "sks", "--create-missing", "photo of {stem}"]) == 0
    assert "1 image(s) captioned in metadata.jsonl were left alone" in capsys.readouterr().err
    assert (d / "a.caption").read_text().strip() == "sks from caption file" and not (d / "a.txt").exists()
    assert not (d / "b.txt").exists() and (d / "c.txt").read_text().strip() == "sks photo of c"
    assert {i.image.name: i.caption for i in collect_items(d)} == {
        "a.png": "sks from caption file", "b.png": "from jsonl", "c.png": "sks photo of c"}


def test_caption_bad_input_writes_nothing(tmp_path, capsys):
    d = folder(tmp_path, {"a": "fine", "b": None})
    (d / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    before = tree_hash(d)
    assert main(["caption", str(d), "--trigger", "sks"]) == 2
    one_line_error(capsys, "b.txt", "not UTF-8")
    assert main(["caption", str(d)]) == 2
    one_line_error(capsys, "nothing to do")
    assert main(["caption", str(d), "--replace", "nope"]) == 2
    one_line_error(capsys, "not OLD=NEW")
    assert main(["caption", str(d), "--restore", str(tmp_path)]) == 2
    one_line_error(capsys, "not a caption backup of this folder")
    assert tree_hash(d) == before


# -- resize -----------------------------------------------------------------------------------------
def test_resize_never_writes_into_the_input(tmp_path, capsys):
    d = folder(tmp_path, {"a": "a", "b": "b"})
    Image.new("RGBA", (300, 100), (255, 0, 0, 0)).save(d / "alpha.png")
    (d / "alpha.txt").write_text("transparent")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 60), "blue").save(d / "turned.jpg", exif=exif)
    (d / "broken.png").write_bytes(b"junk")
    (d / "sub").mkdir()
    shape(seed=5).save(d / "sub" / "s.bmp")
    (d / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "s.bmp", "text": "a bitmap"}) + "\n")
    before = tree_hash(d)
    out = tmp_path / "out"
    assert main(["resize", str(d), str(out), "--max-side", "50", "--background", "#00ff00"]) == 0
    assert "skipped " in capsys.readouterr().err
    assert tree_hash(d) == before
    img = Image.open(out / "alpha.png")
    assert img.size == (50, 17) and img.mode == "RGB" and img.getpixel((1, 1)) == (0, 255, 0)
    assert (out / "alpha.txt").read_text() == "transparent"
    turned = Image.open(out / "turned.jpg")  # JPEG stays JPEG, written upright without the EXIF tag
    assert turned.format == "JPEG" and turned.size == (25, 50) and turned.getexif().get(0x0112) is None
    assert Image.open(out / "sub" / "s.png").format == "PNG" and not (out / "broken.png").exists()
    assert json.loads((out / "sub" / "metadata.jsonl").read_text()) == {"file_name": "s.png", "text": "a bitmap"}
    assert {i.image.name: i.caption for i in collect_items(out / "sub")} == {"s.png": "a bitmap"}


def test_resize_to_buckets_and_refusals(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    for name, size in {"wide": (1920, 1080), "square": (300, 300), "tall": (600, 1200)}.items():
        Image.new("RGB", size, "red").save(d / f"{name}.png")
    out = tmp_path / "b"
    assert main(["resize", str(d), str(out), "--buckets", "512", "--quiet"]) == 0
    assert {p.name: Image.open(p).size for p in out.iterdir()} == {
        "wide.png": (640, 384), "square.png": (512, 512), "tall.png": (320, 704)}
    assert main(["resize", str(d), str(tmp_path / "nu"), "--buckets", "512", "--no-upscale", "--quiet"]) == 0
    assert Image.open(tmp_path / "nu" / "square.png").size == (256, 256)
    capsys.readouterr()
    assert main(["resize", str(d), str(d / "inside")]) == 2
    one_line_error(capsys, "inside the input folder")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "tall.png").write_text("mine")
    assert main(["resize", str(d), str(tmp_path / "partial"), "--max-side", "64"]) == 2
    one_line_error(capsys, "tall.png", "already exists", "--overwrite")
    assert os.listdir(tmp_path / "partial") == ["tall.png"]  # checked before anything was written
    assert main(["resize", str(d), str(tmp_path / "partial"), "--max-side", "64", "--overwrite", "--quiet"]) == 0
    assert Image.open(tmp_path / "partial" / "tall.png").size == (32, 64)
    Image.new("RGB", (8, 8)).save(d / "wide.jpg")
    capsys.readouterr()
    assert main(["resize", str(d), str(tmp_path / "clash"), "--format", "png"]) == 2
    one_line_error(capsys, "would both be written as wide.png")
    assert exit_code(["resize", str(d), str(tmp_path / "x"), "--background", "greenish"]) == 2
    one_line_error(capsys, "'greenish' is not a colour")


# -- convert ----------------------------------------------------------------------------------------
def test_convert_between_jsonl_sidecars_and_kohya_folders(tmp_path, capsys):
    d = tmp_path / "kohya"
    concept = d / "5_zorbly_cat"
    concept.mkdir(parents=True)
    for i in range(2):
        shape(seed=i).save(concept / f"{i}.png")
    (concept / "0.txt").write_text("a zorbly cat on a mat")
    assert main(["convert", str(d), "--to", "jsonl"]) == 0
    rows = [json.loads(line) for line in (concept / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "0.png", "text": "a zorbly cat on a mat", "repeats": 5},
                    {"file_name": "1.png", "text": "zorbly cat", "repeats": 5}]  # uncaptioned: the folder name
    items = collect_items(d)
    assert [(i.caption, i.repeats) for i in items] == [("a zorbly cat on a mat", 5), ("zorbly cat", 5)]
    (concept / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a red cat"}) + "\n" +
                                            json.dumps({"file_name": "1.png", "caption": "a blue cat"}) + "\n")
    assert main(["convert", str(d), "--to", "sidecar"]) == 0
    assert (concept / "0.txt").read_text().strip() == "a zorbly cat on a mat"  # a sidecar wins, as in training
    assert (concept / "1.txt").read_text().strip() == "a blue cat"
    capsys.readouterr()
    jsonl = (concept / "metadata.jsonl").read_text()
    assert main(["convert", str(d), "--to", "jsonl"]) == 0
    assert "1 existing file(s) differ and were kept" in capsys.readouterr().err
    assert (concept / "metadata.jsonl").read_text() == jsonl  # never replaced silently
    assert main(["convert", str(d), "--to", "jsonl", "--overwrite"]) == 0
    assert '"text": "a zorbly cat on a mat"' in (concept / "metadata.jsonl").read_text()
    backup = max((d / ".imglora-backup").iterdir())  # the newest
    assert (backup / "5_zorbly_cat" / "metadata.jsonl").read_text() == jsonl


def test_convert_into_a_copy_leaves_the_input_alone(tmp_path, capsys):
    d = folder(tmp_path, {"a": "an apple", "b": "a banana", "nothing": None})
    (d / "sub").mkdir()
    shape(seed=9).save(d / "sub" / "c.png")
    (d / "sub" / "c.txt").write_text("a cherry")
    before = tree_hash(d)
    assert main(["convert", str(d), "--to", "jsonl", "--dry-run"]) == 0
    assert '+{"file_name": "a.png", "text": "an apple"}' in capsys.readouterr().out
    out = tmp_path / "hf"
    assert main(["convert", str(d), "--to", "jsonl", "--one-file", "--out", str(out)]) == 0
    assert tree_hash(d) == before
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "a.png", "text": "an apple"}, {"file_name": "b.png", "text": "a banana"},
                    {"file_name": "sub/c.png", "text": "a cherry"}]
    assert not (out / "nothing.png").exists() and (out / "sub" / "c.png").read_bytes() == \
        (d / "sub" / "c.png").read_bytes()
    assert {i.image.name: i.caption for i in collect_items(out)} == {"a.png": "an apple", "b.png": "a banana",
                                                                     "c.png": "a cherry"}
    capsys.readouterr()
    assert main(["convert", str(d), "--to", "jsonl", "--out", str(out)]) == 2
    one_line_error(capsys, "already exists")


# -- stats ------------------------------------------------------------------------------------------
def test_stats_uses_the_trainers_buckets_and_plots(tmp_path, capsys):
    d = tmp_path / "s"
    d.mkdir()
    for name, size in {"wide": (1920, 1080), "square": (800, 800), "tall": (600, 1200)}.items():
        Image.new("RGB", size).save(d / f"{name}.jpg")
        (d / f"{name}.txt").write_text(f"{name}, photo")
    (d / "3_rep").mkdir()
    Image.new("RGB", (200, 200)).save(d / "3_rep" / "small.png")
    (d / "3_rep" / "small.txt").write_text("small, photo")
    plot = tmp_path / "p.png"
    assert main(["stats", str(d), "--resolution", "512", "--plot", str(plot), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)
    # nearest aspect ratio, area ≤ 512², repeats counted
    assert stats["buckets"] == {"320x704": 1, "512x512": 4, "640x384": 1}
    assert stats["upscaled"] == 1 and stats["images"] == 4
    assert {i["path"].rsplit("/", 1)[1]: i["bucket"] for i in stats["per_image"]} == {
        "small.png": "512x512", "square.jpg": "512x512", "tall.jpg": "320x704", "wide.jpg": "640x384"}
    assert dict(stats["top_tags"])["photo"] == 4 and stats["caption_tokens"]["exact"] is False
    assert Image.open(plot).size[0] > 500
    assert main(["stats", str(d), "--resolution", "512", "--no-upscale", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "192x192" in text and "caption length in CLIP tokens, estimated" in text
    assert main(["stats", str(d), "--plot", str(plot), "--quiet"]) == 2
    one_line_error(capsys, "already exists")
    assert main(["stats", str(d), "--plot", str(d / "p.png")]) == 2
    one_line_error(capsys, "inside the input folder")
    (tmp_path / "empty").mkdir()
    assert main(["stats", str(tmp_path / "empty")]) == 2
    one_line_error(capsys, "no images found")


# -- synth ------------------------------------------------------------------------------------------
def test_synth_is_deterministic_and_validates(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["synth", "shapes", str(tmp_path / name), "--n", "6", "--seed", "3", "--size", "32",
                     "--shapes", "star", "circle", "--word", "star=zorbly"]) == 0
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    captions = [p.read_text() for p in (tmp_path / "a").glob("*.txt")]
    assert any("zorbly" in c for c in captions) and not any("star" in c for c in captions)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temp folder left behind
    assert len(collect_items(tmp_path / "a")) == 6
    capsys.readouterr()
    for argv, words in [(["--shapes", "hexagon"], ("unknown shape hexagon",)),
                        (["--word", "star"], ("is not SHAPE=WORD",)),
                        (["--n", "0"], ("--n: 0 must be above 0",))]:
        assert exit_code(["synth", "shapes", str(tmp_path / "c"), *argv]) == 2
        one_line_error(capsys, *words)
    assert main(["synth", "shapes", str(tmp_path / "a"), "--n", "2"]) == 2
    one_line_error(capsys, "not an empty folder")
    (tmp_path / "file").write_text("x")
    assert main(["synth", "shapes", str(tmp_path / "file"), "--n", "2"]) == 2
    one_line_error(capsys, "not an empty folder")
    (tmp_path / "empty").mkdir()
    assert main(["synth", "shapes", str(tmp_path / "empty"), "--n", "2", "--size", "16"]) == 0


@pytest.mark.parametrize("command", ["resize", "convert", "caption"])
def test_a_missing_folder_is_one_line(tmp_path, capsys, command):
    extra = {"resize": [str(tmp_path / "o")], "convert": ["--to", "jsonl"], "caption": ["--dedupe"]}[command]
    assert main([command, str(tmp_path / "nope"), *extra]) == 2
    one_line_error(capsys, "no such folder")


def test_caption_and_convert_never_write_through_a_link_to_another_folder(tmp_path, capsys):
    mine, other = tmp_path / "mine", tmp_path / "other"
    for d in (mine, other):
        d.mkdir()
        for i in range(2):
            shape(seed=i).save(d / f"{i}.png")
            (d / f"{i}.txt").write_text("a red circle")
    os.symlink(other, mine / "linked")
    before = tree_hash(other)
    assert main(["caption", str(mine), "--trigger", "zorbly"]) == 0
    said = capsys.readouterr()
    assert "linked: skipped, links outside the folder" in said.out + said.err
    assert tree_hash(other) == before  # the other dataset's captions are untouched
    assert (mine / "0.txt").read_text().startswith("zorbly")
