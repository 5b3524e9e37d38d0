"""caption, resize, convert, stats and synth: what they write, and that DIR is left alone where promised."""

import json

from PIL import Image

from datasets_tools.cli import main
from imglora.data.captions import collect_items

from .test_check import shape, tree_hash


def folder(tmp_path, captions):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for i, (name, text) in enumerate(captions.items()):
        shape(seed=i).save(d / f"{name}.png")
        if text is not None:
            (d / f"{name}.txt").write_text(text)
    return d


def test_caption_edits_with_dry_run_and_backup(tmp_path, capsys):
    d = folder(tmp_path, {"a": "red, circle, red, white background", "b": "blue, square", "my_cat_photo": None})
    before = tree_hash(d)
    args = ["caption", str(d), "--trigger", "zorbly", "--replace", "red=crimson", "--remove", "square", "--dedupe",
            "--create-missing", "filename"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+zorbly, crimson, circle, white background" in out and "+zorbly my cat photo" in out
    assert tree_hash(d) == before  # a dry run writes nothing
    assert main(args) == 0
    assert (d / "a.txt").read_text().strip() == "zorbly, crimson, circle, white background"
    assert (d / "b.txt").read_text().strip() == "zorbly blue"
    assert (d / "my_cat_photo.txt").read_text().strip() == "zorbly my cat photo"
    backup = next((d / ".imglora-backup").iterdir())
    assert (backup / "a.txt").read_text() == "red, circle, red, white background"
    assert json.loads((backup / "manifest.json").read_text())["created"] == ["my_cat_photo.txt"]
    assert main(args) == 0  # idempotent: the trigger is not added twice
    assert (d / "a.txt").read_text().strip() == "zorbly, crimson, circle, white background"


def test_resize_never_writes_into_the_input(tmp_path):
    d = folder(tmp_path, {"a": "a", "b": "b"})
    rgba = Image.new("RGBA", (300, 100), (255, 0, 0, 0))
    rgba.save(d / "alpha.png")
    (d / "alpha.txt").write_text("transparent")
    before = tree_hash(d)
    out = tmp_path / "out"
    assert main(["resize", str(d), str(out), "--max-side", "50", "--background", "#00ff00"]) == 0
    assert tree_hash(d) == before
    img = Image.open(out / "alpha.png")
    assert img.size == (50, 17) and img.mode == "RGB" and img.getpixel((1, 1)) == (0, 255, 0)
    assert (out / "alpha.txt").read_text() == "transparent"
    assert main(["resize", str(d), str(tmp_path / "buckets"), "--buckets", "64"]) == 0
    assert Image.open(tmp_path / "buckets" / "a.png").size == (64, 64)
    assert main(["resize", str(d), str(d / "inside")]) == 2
    assert main(["resize", str(d), str(out), "--max-side", "50"]) == 2  # would overwrite


def test_convert_between_jsonl_sidecars_and_kohya_folders(tmp_path):
    d = tmp_path / "kohya"
    concept = d / "5_zorbly_cat"
    concept.mkdir(parents=True)
    for i in range(2):
        shape(seed=i).save(concept / f"{i}.png")
    assert main(["convert", str(d), "--to", "jsonl"]) == 0
    rows = [json.loads(line) for line in (concept / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "0.png", "text": "zorbly cat", "repeats": 5},
                    {"file_name": "1.png", "text": "zorbly cat", "repeats": 5}]
    items = collect_items(d)
    assert [(i.caption, i.repeats) for i in items] == [("zorbly cat", 5)] * 2
    (concept / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a red cat"}) + "\n" +
                                            json.dumps({"file_name": "1.png", "caption": "a blue cat"}) + "\n")
    assert main(["convert", str(d), "--to", "sidecar"]) == 0
    assert (concept / "0.txt").read_text().strip() == "a red cat" and (concept / "1.txt").read_text().strip() == \
        "a blue cat"


def test_stats_uses_the_trainers_buckets_and_plots(tmp_path, capsys):
    d = tmp_path / "s"
    d.mkdir()
    for name, size in {"wide": (1920, 1080), "square": (800, 800), "tall": (600, 1200)}.items():
        Image.new("RGB", size).save(d / f"{name}.jpg")
        (d / f"{name}.txt").write_text(f"{name}, photo")
    assert main(["stats", str(d), "--resolution", "512", "--plot", str(tmp_path / "p.png"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["buckets"] == {"320x704": 1, "512x512": 1, "640x384": 1}  # nearest aspect, area ≤ 512²
    assert dict(stats["top_tags"])["photo"] == 3
    assert Image.open(tmp_path / "p.png").size[0] > 500


def test_synth_is_deterministic_and_validates(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["synth", "shapes", str(tmp_path / name), "--n", "6", "--seed", "3", "--size", "32",
                     "--shapes", "star", "circle", "--word", "star=zorbly"]) == 0
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    captions = [p.read_text() for p in (tmp_path / "a").glob("*.txt")]
    assert any("zorbly" in c for c in captions) and not any("star" in c for c in captions)
    assert main(["synth", "shapes", str(tmp_path / "c"), "--shapes", "hexagon"]) == 2
    assert "unknown shape hexagon" in capsys.readouterr().err
