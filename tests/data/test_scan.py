"""The trainer's pre-training scan (RELIABILITY.md I8): bad files listed with reasons, the rest usable, nothing written."""

import io
import os

from helpers import tree_hash
from PIL import Image

from imglora.data.captions import Item, collect_items
from imglora.data.scan import scan_items
from imglora.synthetic.shapes import synth_shapes


def test_one_bad_image_in_100_is_listed_and_99_remain(tmp_path):
    synth_shapes(tmp_path, 100, seed=1, size=64)
    (tmp_path / "00042.png").write_bytes(b"<html>gone</html>")
    before = tree_hash(tmp_path)
    scan = scan_items(collect_items(tmp_path), min_side=32, workers=4, progress=False)
    assert len(scan.ok) == 99 and len(scan.infos) == 99
    assert [(p.path.name, p.reason) for p in scan.problems] == [
        ("00042.png", "not a supported image (HTML page in a .png file; a failed download?)")]
    assert all(p.fix for p in scan.problems)
    assert tree_hash(tmp_path) == before  # the scan changes nothing


def test_every_kind_of_bad_item_gets_its_reason(tmp_path):
    d = tmp_path
    Image.new("RGB", (96, 96), "red").save(d / "good.png")
    jpeg = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(jpeg, "JPEG")
    (d / "half.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "zero.png").write_bytes(b"")
    Image.new("1", (14000, 14000)).save(d / "bomb.png")
    Image.new("RGB", (8, 8)).save(d / "tiff.png", format="TIFF")
    Image.new("RGB", (96, 20)).save(d / "thin.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (96, 20)).save(d / "thin_rotated.jpg", exif=exif)  # 20x96 after rotation: still thin
    os.symlink(d / "gone.png", d / "dead.png")
    items = [Item(d / n, "a caption") for n in ("good.png", "half.jpg", "zero.png", "bomb.png", "tiff.png",
                                                "thin.png", "thin_rotated.jpg", "dead.png")]
    items += [Item(d / "good.png", None, problem="missing caption")]
    before = tree_hash(d)
    scan = scan_items(items, min_side=32, progress=False)
    reasons = [(p.path.name, p.reason) for p in scan.problems]
    assert reasons == [
        ("half.jpg", "truncated image (the file is cut short)"),
        ("zero.png", "not a supported image (empty file, 0 bytes)"),
        ("bomb.png", "decompression bomb (196 MP)"),
        ("tiff.png", "not a supported image (TIFF data in a .png file)"),
        ("thin.png", "too small (96x20, under 32 px)"),
        ("thin_rotated.jpg", "too small (20x96, under 32 px)"),
        ("dead.png", "broken symlink"),
        ("good.png", "missing caption"),
    ]
    assert [i.image.name for i in scan.ok] == ["good.png"]
    assert scan.infos[d / "thin_rotated.jpg"].size == (20, 96)  # the size the trainer buckets by
    assert tree_hash(d) == before


def test_progress_bar_reports_rate_on_stderr(tmp_path, capsys, monkeypatch):
    synth_shapes(tmp_path, 30, seed=2, size=32)
    items = collect_items(tmp_path)
    import imglora.data.scan as scan_module

    real = scan_module.tqdm
    # The bar waits 0.5 s before it shows (quick scans stay quiet); this one is quicker than that.
    monkeypatch.setattr(scan_module, "tqdm", lambda *a, **k: real(*a, **{**k, "delay": 0, "mininterval": 0}))
    scan_items(items, min_side=16, progress=True)
    assert scan_items(items, min_side=16, progress=False).ok == items
    out = capsys.readouterr()
    assert "scanning images" in out.err and "30/30" in out.err and "img/s" in out.err and not out.out
