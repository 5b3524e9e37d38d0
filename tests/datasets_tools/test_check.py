"""`imglora-data check`: a folder with every problem planted; each is reported once, clean files never."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_helpers import exit_code, shape, tree_hash
from datasets_tools.check import check_folder, count_tokens
from datasets_tools.cli import main
from imglora.data.captions import collect_items
from imglora.data.scan import scan_items

# Pillow warns between 1x and 2x its pixel limit; imglora refuses those itself (test_images.py checks both ways).
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _header_only_png(w, h) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def planted(tmp_path):
    """(folder, {relative path: the one reason expected for it}); clean*.png must never be reported."""
    d = tmp_path / "data"
    d.mkdir()
    expect = {}

    def put(name, img_or_bytes, reason=None, caption="a red circle on a white background", **save):
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(img_or_bytes, bytes):
            path.write_bytes(img_or_bytes)
        else:
            img_or_bytes.save(path, **save)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
        if reason:
            expect[name] = reason

    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        put(f"clean{i}.png", shape(colour, seed=i))
    put("clean_rgba.png", shape("purple", seed=4).convert("RGBA"))  # opaque alpha: nothing to say
    put("sub/clean5.jpg", shape("orange", (160, 128), seed=5), quality=92)

    jpeg = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(jpeg, "JPEG")
    put("truncated.jpg", jpeg.getvalue()[:900], "truncated")
    put("zero.png", b"", "not a supported image (empty file")
    put("notimage.png", b"<html>nope</html>", "not a supported image (HTML page")
    put("tiff.png", b"II*\x00" + bytes(60), "not a supported image (TIFF data")
    put("bomb.png", b"", "decompression bomb (196 MP)")
    Image.new("1", (14000, 14000)).save(d / "bomb.png")
    put("big.png", _header_only_png(10000, 10000), "decompression bomb (100 MP)")
    put("cmyk.jpg", Image.new("CMYK", (96, 96), (0, 200, 200, 0)), "CMYK image")
    p = shape("blue", seed=7).convert("P")
    put("palette.png", p, "palette with transparency", transparency=0)
    put("la.png", shape("green", seed=8).convert("LA"), "grey with alpha")
    put("deep.png", Image.fromarray(np.arange(96 * 96, dtype="uint16").reshape(96, 96) * 7, "I;16"), "16-bit")
    put("mono.png", shape("purple", seed=9).convert("1"), "1-bit")
    cut_out = shape("red", seed=19).convert("RGBA")
    cut_out.putalpha(Image.new("L", cut_out.size, 0).resize(cut_out.size))
    put("alpha.png", cut_out, "transparent pixels")
    frames = [shape(c, seed=10) for c in ("red", "blue")]
    put("anim.gif", frames[0], "animated (2 frames)", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", shape("orange", (128, 96), seed=11), "EXIF rotation", exif=exif)
    put("tiny.png", shape("yellow", (24, 24), seed=12), "too small (24x24, under 32 px)")
    put("wide.png", shape("red", (512, 64), seed=13), "extreme aspect ratio")
    put("pngdata.jpg", shape("green", seed=20), "PNG data in a .jpg file", format="PNG")
    put("nocaption.png", shape("blue", seed=14), "missing caption", caption=None)
    put("5_sks/k.png", shape("blue", seed=21), "missing caption", caption=None)
    put("empty.png", shape("green", seed=15), caption="   ")
    expect["empty.txt"] = "empty caption"
    put("latin1.png", shape("red", seed=16), caption=None)
    (d / "latin1.txt").write_bytes("un caf\xe9".encode("latin-1"))
    expect["latin1.txt"] = "caption is not UTF-8"
    put("long.png", shape("blue", seed=17), caption=", ".join(f"tag{i} word" for i in range(60)))
    expect["long.txt"] = "caption too long (at least 291 CLIP tokens by estimate; 77 are read)"
    (d / "orphan.txt").write_text("an orphan")
    expect["orphan.txt"] = "caption without an image"
    (d / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    expect["photo.heic"] = "not a supported image type (.heic)"
    put("hf/in_jsonl.png", shape("yellow", seed=22), caption=None)
    put("hf/conflict.png", shape("orange", seed=23), caption="the sidecar says this")
    (d / "hf" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"file_name": "in_jsonl.png", "text": "a yellow thing"}, {"file_name": "gone.png", "text": "lost"},
        {"file_name": "conflict.png", "text": "the jsonl says that"}]) + "\n")
    expect["hf/gone.png"] = "caption without an image (a row of metadata.jsonl)"
    expect["hf/conflict.txt"] = "caption differs from its row in metadata.jsonl (conflict.txt is used)"
    put("copy.png", (d / "clean0.png").read_bytes(), "exact duplicate of")
    put("near.png", shape("red", seed=0).resize((120, 120)).resize((128, 128)), "near duplicate of")  # resampled
    put("reencoded.jpg", shape("green", seed=1), "near duplicate of", quality=60)  # clean1 as a JPEG
    put("half.png", shape("blue", seed=2).resize((64, 64)), "near duplicate of")  # clean2 at half size
    os.symlink(d / "nowhere.png", d / "dead.png")
    (d / "dead.txt").write_text("a link to nothing")
    expect["dead.png"] = "broken symlink"
    os.mkfifo(d / "pipe.png")
    (d / "pipe.txt").write_text("a fifo")
    expect["pipe.png"] = "not a regular file"
    (d / "loop").mkdir()
    os.symlink(d, d / "loop" / "back")
    expect["loop/back"] = "symlink loop"
    return d, expect


def by_file(problems, root):
    out: dict[str, list[dict]] = {}
    for p in problems:
        out.setdefault(Path(p["path"]).relative_to(root).as_posix(), []).append(p)
    return out


def test_every_planted_problem_is_reported_once_and_nothing_changes(tmp_path, capsys):
    d, expect = planted(tmp_path)
    before = tree_hash(d)
    assert main(["check", str(d), "--json", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    found = by_file(report["problems"], d)
    for name, reason in expect.items():
        assert name in found, (name, reason, sorted(found))
        assert len(found[name]) == 1 and reason in found[name][0]["reason"], (name, found[name])
    assert not any("clean" in n for n in found), {n: v for n, v in found.items() if "clean" in n}
    assert set(found) == set(expect), set(found) ^ set(expect)
    assert all(p["fix"] and p["severity"] in ("error", "warning") for p in report["problems"])
    assert report["images"] == 36  # 6 clean, 30 planted (a broken link and a FIFO among them)
    assert report["errors"] + report["warnings"] == len(report["problems"]) == len(expect)
    severity = {n: v[0]["severity"] for n, v in found.items()}
    assert severity["truncated.jpg"] == severity["nocaption.png"] == severity["latin1.txt"] == "error"
    assert severity["rotated.jpg"] == severity["near.png"] == "warning"
    assert "--caption-fallback folder" in found["5_sks/k.png"][0]["fix"]  # kohya style
    assert tree_hash(d) == before


def test_check_and_the_trainers_scan_agree_on_what_is_unusable(tmp_path):
    d, _ = planted(tmp_path)
    report = check_folder(d, progress=False)  # both with the one default minimum side
    errors = {Path(f.path).with_suffix("") for f in report.findings if f.severity == "error" and f.kind != "folder"}
    scan = scan_items(collect_items(d, log=None), progress=False)
    assert errors == {p.path.with_suffix("") for p in scan.problems}


def test_text_output_and_exit_codes(tmp_path, capsys):
    d = tmp_path / "ok"
    d.mkdir()
    for i in range(3):
        shape(seed=i).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text("a red circle")
    assert main(["check", str(d)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "3 images, no problems found" in out.err
    (d / "3.png").write_bytes(b"junk")
    assert main(["check", str(d), "--quiet"]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"{d / '3.png'}: error: not a supported image (text in a .png file; a failed "
                                    "download?) — download it again or remove it",
                                    f"{d / '3.png'}: error: missing caption — add a .txt caption beside it "
                                    "(`imglora-data caption --create-missing filename|folder|TEMPLATE`)"]
    assert "1 error" not in out.err and "2 error(s)" in out.err
    # What training would do: with --caption-fallback the missing caption is no problem
    assert main(["check", str(d), "--caption-fallback", "filename", "--json"]) == 1
    assert [p["reason"][:20] for p in json.loads(capsys.readouterr().out)["problems"]] == ["not a supported imag"]


@pytest.mark.parametrize("argv,message", [
    (["check"], "the following arguments are required: dir"),
    (["check", "{d}", "--min-side", "zero"], "argument --min-side: 'zero' is not a number"),
    (["check", "{d}", "--max-aspect", "-1"], "argument --max-aspect: -1 must be above 0"),
    (["check", "{d}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["check", "{d}/missing"], "no such folder"),
    (["check", "{d}", "--tokenizer", "{d}"], "not a CLIP tokenizer folder"),
    (["check", "{d}", "--caption-fallback", "{{bad}}"], "caption template"),
    (["frob"], "invalid choice: 'frob'"),
])
def test_bad_usage_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert exit_code([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imglora-data: ") and message in err[0] and " — " in err[0], err


def test_the_console_script_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "datasets_tools.cli", "check", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"imglora-data: {tmp_path / 'nope'}: no such folder — pass the folder of " \
                                 "training images"


def test_near_duplicates_are_found_and_distinct_pictures_are_not(tmp_path):
    d = tmp_path / "dups"
    d.mkdir()
    for i in range(40):  # synthetic shapes: flat backgrounds, the hard case for a difference hash
        shape(("red", "green", "blue", "yellow", "purple", "orange")[i % 6], seed=100 + i).save(d / f"{i:02d}.png")
    # A photo-like picture: smooth colour blobs
    photo = Image.merge("RGB", [Image.effect_noise((16, 12), 70).resize((512, 384), Image.Resampling.BICUBIC)
                                for _ in range(3)])
    photo.save(d / "photo.png")
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(d / "mirrored.png")  # a different picture
    photo.resize((256, 192)).save(d / "photo_small.png")
    photo.save(d / "photo_q50.jpg", quality=50)
    photo.crop((4, 3, 508, 381)).save(d / "photo_crop.png")
    photo.transpose(Image.Transpose.ROTATE_90).save(d / "photo_turned.jpg", exif=_exif(6))  # upright via EXIF
    report = check_folder(d, progress=False)
    dups = {Path(f.path).name: f.reason for f in report.findings if f.kind == "duplicate"}
    assert set(dups) == {"photo_small.png", "photo_q50.jpg", "photo_crop.png", "photo_turned.jpg"}, dups
    assert check_folder(d, near_bits=-1, progress=False).findings == [f for f in report.findings
                                                                     if f.kind != "duplicate"]


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_caption_length_estimate_and_exact_count_with_a_tokenizer(tmp_path):
    from imglora.models.tiny import write_clip_tokenizer

    tok_dir = write_clip_tokenizer(tmp_path / "model" / "tokenizer", ["red", "circle", "square"])
    assert count_tokens("a red circle, on white!") == (9, False)  # a red circle , on white ! + start/end
    d = tmp_path / "d"
    d.mkdir()
    shape(seed=0).save(d / "a.png")
    (d / "a.txt").write_text("red circle square " * 26)  # 78 words: too long either way
    shape(seed=1).save(d / "b.png")
    (d / "b.txt").write_text("zqxjkv " * 20)  # 22 pieces, but out of vocabulary: each letter is a token
    est = {Path(f.path).name: f.reason for f in check_folder(d, progress=False).findings}
    assert est == {"a.txt": "caption too long (at least 80 CLIP tokens by estimate; 77 are read)"}
    from datasets_tools.check import load_tokenizer

    for folder in (tok_dir, tmp_path / "model"):  # a tokenizer folder, or a model folder holding tokenizer/
        exact = {Path(f.path).name: f.reason for f in check_folder(d, tokenizer=load_tokenizer(folder),
                                                                   progress=False).findings}
        assert exact["a.txt"] == "caption too long (80 CLIP tokens; 77 are read)"
        assert exact["b.txt"].startswith("caption too long (") and "estimate" not in exact["b.txt"]
