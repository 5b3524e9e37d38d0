"""`imglora-data check`: a folder with every problem planted; each is reported once, clean files never."""

import hashlib
import io
import json
import os

from PIL import Image

from datasets_tools.cli import main


def tree_hash(root) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(p.encode())
            if not os.path.islink(p):
                h.update(open(p, "rb").read())
    return h.hexdigest()


def shape(colour="red", size=(96, 96), seed=0):
    """A distinct picture per seed: different shapes, positions and backgrounds."""
    import random

    from imglora.data.synth import BASE_SHAPES, NEW_SHAPES, render

    kinds = BASE_SHAPES + NEW_SHAPES
    bg = ("white", "black", "gray")[seed % 3]
    return render(kinds[seed % len(kinds)], colour, bg, size[0], random.Random(seed)).resize(size)


def planted(tmp_path):
    d = tmp_path / "data"
    d.mkdir()

    def caption(name, text="a red circle on a white background"):
        (d / name).with_suffix(".txt").write_text(text)

    for i, colour in enumerate(["red", "green", "blue"]):  # clean files
        shape(colour, seed=i).save(d / f"clean{i}.png")
        caption(f"clean{i}.png")
    expect = {}
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[:900])
    caption("truncated.jpg")
    expect["truncated.jpg"] = "truncated"
    (d / "zero.png").write_bytes(b"")
    caption("zero.png")
    expect["zero.png"] = "empty file"
    (d / "notimage.png").write_bytes(b"<html>nope</html>")
    caption("notimage.png")
    expect["notimage.png"] = "not a supported image"
    Image.new("1", (14000, 14000)).save(d / "bomb.png")
    caption("bomb.png")
    expect["bomb.png"] = "decompression bomb"
    Image.new("CMYK", (96, 96), (0, 200, 200, 0)).save(d / "cmyk.jpg")
    caption("cmyk.jpg")
    expect["cmyk.jpg"] = "CMYK"
    p = shape("blue", seed=7).convert("P")
    p.save(d / "palette.png", transparency=0)
    caption("palette.png")
    expect["palette.png"] = "palette with transparency"
    shape("green", seed=8).convert("LA").save(d / "la.png")
    caption("la.png")
    expect["la.png"] = "grey with alpha"
    Image.fromarray((__import__("numpy").arange(96 * 96, dtype="uint16").reshape(96, 96) * 7), "I;16").save(
        d / "deep.png")
    caption("deep.png")
    expect["deep.png"] = "16-bit"
    shape("purple", seed=9).convert("1").save(d / "mono.png")
    caption("mono.png")
    expect["mono.png"] = "1-bit"
    frames = [shape(c, seed=10) for c in ("red", "blue")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    caption("anim.gif")
    expect["anim.gif"] = "animated (2 frames)"
    exif = Image.Exif()
    exif[0x0112] = 6
    shape("orange", size=(128, 96), seed=11).save(d / "rotated.jpg", exif=exif)
    caption("rotated.jpg")
    expect["rotated.jpg"] = "EXIF rotation"
    shape("yellow", size=(32, 32), seed=12).save(d / "tiny.png")
    caption("tiny.png")
    expect["tiny.png"] = "too small"
    shape("red", size=(512, 64), seed=13).save(d / "wide.png")
    caption("wide.png")
    expect["wide.png"] = "extreme aspect ratio"
    shape("blue", seed=14).save(d / "nocaption.png")
    expect["nocaption.png"] = "missing caption"
    shape("green", seed=15).save(d / "empty.png")
    caption("empty.png", "   ")
    expect["empty.txt"] = "empty caption"
    shape("red", seed=16).save(d / "latin1.png")
    (d / "latin1.txt").write_bytes("un caf\xe9".encode("latin-1"))
    expect["latin1.txt"] = "not UTF-8"
    shape("blue", seed=17).save(d / "long.png")
    caption("long.png", ", ".join(f"tag{i} word" for i in range(60)))
    expect["long.txt"] = "caption too long"
    caption("orphan.png")
    expect["orphan.txt"] = "caption without an image"
    (d / "copy.png").write_bytes((d / "clean0.png").read_bytes())
    caption("copy.png")
    expect["copy.png"] = "exact duplicate of"
    shape("red", seed=0).resize((90, 90)).resize((96, 96)).save(d / "near.png")  # clean0 re-sampled
    caption("near.png")
    expect["near.png"] = "near duplicate of"
    (d / "loop").mkdir()
    os.symlink(d, d / "loop" / "back")
    expect["back"] = "symlink loop"
    return d, expect


def test_every_planted_problem_is_reported_once_and_nothing_changes(tmp_path, capsys):
    d, expect = planted(tmp_path)
    before = tree_hash(d)
    assert main(["check", str(d), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    by_file: dict[str, list[str]] = {}
    for p in problems:
        by_file.setdefault(os.path.basename(p["path"]), []).append(p["reason"])
    for name, reason in expect.items():
        assert name in by_file, (name, reason)
        assert len(by_file[name]) == 1 and reason in by_file[name][0], (name, by_file[name])
    assert not any(n.startswith("clean") for n in by_file), by_file
    assert set(by_file) == set(expect), set(by_file) ^ set(expect)
    assert all(p["fix"] for p in problems)
    assert tree_hash(d) == before


def test_clean_folder_exits_0_and_bad_usage_exits_2(tmp_path, capsys):
    d = tmp_path / "ok"
    d.mkdir()
    shape().save(d / "a.png")
    (d / "a.txt").write_text("a red circle")
    assert main(["check", str(d)]) == 0
    assert main(["check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("imglora-data: ") and "no such folder" in err
